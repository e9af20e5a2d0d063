"""Megatron-core integration on GPUs (2 ranks, NCCL; run by the lead on 2xH200 with
megatron-core 0.19.2, no Transformer Engine):

1. GPTModel built with our layer spec and groups gives the native decoder's logits for the
   same weights (mixtral / qwen2_moe / qwen3_moe shapes, several strategies);
2. MoEExtLayer gives the outputs of Megatron's own MoELayer (alltoall dispatcher, local
   spec, no TE) for every strategy at EP 1 and 2, same weights, float32.

Each test runs all its cases in one pair of processes and reports every failing case with
its traceback, so one device call shows the whole picture.

# S sequence, B batch, H hidden, E experts, V vocab
"""

from __future__ import annotations

import datetime
import traceback
import warnings

import pytest
import torch

from tests.support import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.multirank]  # 2 GPUs, one rank each
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

TIMEOUT = datetime.timedelta(seconds=60)
H, E, FFN, TOP_K = 64, 8, 32, 2


def _plan(strategy: str, world: int, tp: int = 1):
    from moe_ext.plan import plan_with_degrees

    return plan_with_degrees(strategy, world, tp, reason="test")


def _setup(plan, backend: str):
    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron import install_parallel_state, seed_model_parallel_rng

    groups = ProcessGroups.build(plan, backend, TIMEOUT)
    install_parallel_state(groups)
    if torch.cuda.is_available():
        seed_model_parallel_rng(groups, 1234)
    return groups


def _report(rank: int, failures: list[str]) -> None:
    if failures:
        raise AssertionError(
            f"rank {rank}: {len(failures)} case(s) failed:\n\n" + "\n\n".join(failures)
        )


def _tiny_args(model_type: str):
    from moe_ext.model import ModelArgs

    kw = dict(
        model_type=model_type,
        vocab_size=128,
        hidden_size=H,
        intermediate_size=128,
        moe_intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=E,
        num_experts_per_tok=TOP_K,
        rope_theta=10000.0,
    )
    if model_type == "qwen2_moe":
        kw.update(
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
            qkv_bias=True,
            norm_topk_prob=False,
        )
    if model_type == "qwen3_moe":
        kw.update(qk_norm=True)
    return ModelArgs(**kw)


# ---- 1. GPTModel + our layer == native decoder ------------------------------------------

GPT_CASES = [
    ("mixtral", "ep_nccl", 1),
    ("qwen2_moe", "ep_allgather", 1),
    ("qwen3_moe", "replicate", 1),
    ("qwen3_moe", "ep_nccl", 2),
]


def _gpt_case(rank, world, model_type, strategy, tp, backend, device):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from moe_ext.megatron import (
        get_gpt_decoder_block_spec,
        gpt_model_kwargs,
        load_into_megatron,
        native_to_megatron,
        pg_collection,
        transformer_config_kwargs,
        uninstall_parallel_state,
    )
    from moe_ext.model import Transformer, init_random_full

    args = _tiny_args(model_type)
    plan = _plan(strategy, world, tp)
    groups = _setup(plan, backend)
    try:
        config = TransformerConfig(
            **transformer_config_kwargs(
                args,
                plan,
                perform_initialization=False,
                use_cpu_initialization=device.type == "cpu",
            )
        )
        spec = get_gpt_decoder_block_spec(config, plan, groups)
        model = (
            GPTModel(config, spec, pg_collection=pg_collection(groups), **gpt_model_kwargs(args))
            .to(device)
            .eval()
        )
        full = init_random_full(args)
        load_into_megatron(model, native_to_megatron(full, args, plan, groups))
        native = Transformer(args)
        native.load_state_dict(full)
        native = native.to(device).eval()
        # TP ranks must feed identical tokens (no sequence parallelism)
        seed = 11 + (groups.dp_rank if tp > 1 else rank)
        tokens = torch.randint(
            0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed)
        ).to(device)
        positions = torch.arange(9, device=device)[None].expand(2, 9)
        mask = None  # Megatron builds the causal mask itself on CUDA
        if device.type == "cpu":
            mask = torch.triu(torch.ones(9, 9), 1).bool()[None, None]
        with torch.no_grad():
            logits = model(tokens, positions, mask)  # [B, S, V / tp]
            ref = native(tokens)  # [B, S, V]
        if tp > 1:
            vocab = args.vocab_size // tp
            ref = ref[..., groups.tp_rank * vocab : (groups.tp_rank + 1) * vocab]
        torch.testing.assert_close(logits.float(), ref.float(), rtol=1e-3, atol=1e-3)
    finally:
        uninstall_parallel_state()


def _gpt_body(rank, world, backend="nccl"):
    device = _device(rank, backend)
    failures = []
    for model_type, strategy, tp in GPT_CASES:
        try:
            _gpt_case(rank, world, model_type, strategy, tp, backend, device)
        except Exception:  # noqa: BLE001 - every case reported with its traceback
            failures.append(f"[{model_type} {strategy} tp={tp}]\n{traceback.format_exc()}")
    _report(rank, failures)


def _device(rank: int, backend: str) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(rank)
        # float32 comparisons at 1e-4: keep cuBLAS off TF32 whatever a library set
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda", rank)
    return torch.device("cpu")


@pytest.mark.timeout(300)
def test_gptmodel_with_our_layer_matches_native_logits():
    run_ranks(_gpt_body, world_size=2, backend="nccl")


# ---- 2. MoEExtLayer == Megatron's own MoELayer ------------------------------------------

# (strategy, tp): EP 1 (replicate, tp_experts) and EP 2 (ep_*); nvshmem last (most fragile)
LAYER_CASES = [
    ("replicate", 1),
    ("tp_experts", 2),
    ("ep_allgather", 1),
    ("ep_nccl", 1),
    ("ep_nccl", 2),
    ("ep_nvshmem", 1),
]


def _layer_case(rank, world, strategy, tp, backend, device, megatron_dispatcher):
    from moe_ext.bench.peers import megatron_moe_config, megatron_moe_layer
    from moe_ext.megatron import MoEExtLayer, megatron_expert_state, uninstall_parallel_state
    from moe_ext.moe.layer import expert_shard

    plan = _plan(strategy, world, tp)
    groups = _setup(plan, backend)
    try:
        config = megatron_moe_config(
            H,
            FFN,
            E,
            TOP_K,
            plan,
            dispatcher=megatron_dispatcher,
            params_dtype=torch.float32,
            cpu_init=device.type == "cpu",
        )
        theirs = megatron_moe_layer(config, groups).to(device).eval()  # Megatron's MoELayer
        ours = MoEExtLayer(config, plan=plan, groups=groups).to(device).eval()

        gen = torch.Generator().manual_seed(5)  # same full weights on every rank
        router = torch.randn(E, H, generator=gen) * 0.3
        gate_up = torch.randn(E, 2 * FFN, H, generator=gen) * H**-0.5
        down = torch.randn(E, H, FFN, generator=gen) * FFN**-0.5
        local_gate_up, local_down = expert_shard(gate_up, down, ours.dispatcher)
        ours.load_state_dict(
            {
                "router.weight": router,
                "experts.gate_up_proj": local_gate_up,
                "experts.down_proj": local_down,
            }
        )
        with torch.no_grad():
            theirs.router.weight.copy_(router)
        expert_state = megatron_expert_state(
            gate_up,
            down,
            prefix="",
            local_expert_start=ours.dispatcher.local_expert_start,
            num_local=ours.dispatcher.num_local_experts,
            ffn_shards=ours.dispatcher.ffn_shards,
            ffn_rank=ours.dispatcher.ffn_shard_rank,
        )
        result = theirs.experts.load_state_dict(
            {k: v.to(device) for k, v in expert_state.items()}, strict=False
        )
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)

        seed = 21 + (groups.dp_rank if tp > 1 else rank)  # identical tokens within TP
        x = torch.randn(6, 3, H, generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.no_grad():
            y_ours, bias_ours = ours(x)  # [S, B, H]
            y_theirs, _ = theirs(x)
        assert bias_ours is None
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-4, atol=1e-5)
    finally:
        uninstall_parallel_state()


def _layer_body(rank, world, backend="nccl", megatron_dispatcher="alltoall"):
    device = _device(rank, backend)
    failures = []
    for strategy, tp in LAYER_CASES:
        if strategy == "ep_nvshmem" and backend != "nccl":
            continue
        try:
            _layer_case(rank, world, strategy, tp, backend, device, megatron_dispatcher)
        except Exception:  # noqa: BLE001 - every case reported with its traceback
            failures.append(f"[{strategy} tp={tp}]\n{traceback.format_exc()}")
    _report(rank, failures)


@pytest.mark.timeout(300)
def test_our_layer_matches_megatron_moelayer_every_strategy():
    run_ranks(_layer_body, world_size=2, backend="nccl")
