"""Megatron-core integration on 2 gloo ranks (megatron-core 0.16.1 here; the code is also
written for 0.19.x): MoEExtLayer vs a single-rank float64 reference for every strategy,
GPTModel with our layer vs the native decoder (Megatron's CUDA-only helpers redirected to
CPU inside the spawned ranks), and parallel_state installed from our groups. The
single-process cases are in tests/unit/test_megatron.py.

# T tokens, H hidden, E experts, k top-k
"""

from __future__ import annotations

import datetime
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from moe_ext.megatron import (  # noqa: E402
    MegatronConfigError,
    get_gpt_decoder_block_spec,
    native_to_megatron,
    transformer_config_kwargs,
)
from moe_ext.model import init_random_full  # noqa: E402
from tests.support import MEGATRON_E as E  # noqa: E402
from tests.support import MEGATRON_H as H  # noqa: E402
from tests.support import (  # noqa: E402
    megatron_args,
    megatron_config,
    megatron_on_cpu,
    megatron_plan,
    run_ranks,
)

# ---- multi-rank: our layer vs a float64 single-rank reference ------------------------

# (strategy, tp, sequence parallel): under sequence parallelism each TP rank holds its own
# tokens, so tp_experts gathers them over TP and ep_* / replicate use them as they are
LAYER_PLANS = [
    ("replicate", 1, False),
    ("tp_experts", 2, False),
    ("ep_allgather", 1, False),
    ("ep_nccl", 1, False),
    ("ep_nccl", 2, False),
    ("tp_experts", 2, True),
    ("ep_nccl", 2, True),
]


def _layer_body(rank, world):
    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron import MoEExtLayer
    from moe_ext.moe.layer import build_moe_layer

    config_kw = dict(
        moe_shared_expert_intermediate_size=24,
        moe_shared_expert_gate=True,
        moe_router_pre_softmax=True,
        moe_aux_loss_coeff=0.0,
    )
    gen = torch.Generator().manual_seed(7)
    ref = build_moe_layer(
        H,
        16,
        E,
        2,
        norm_topk_prob=False,
        shared_expert_size=24,
        shared_expert_gate=True,
        dtype=torch.float64,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    full = {n: p.detach().float() for n, p in ref.named_parameters()}
    for strategy, tp, sequence_parallel in LAYER_PLANS:
        plan = megatron_plan(strategy, world, tp)
        groups = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
        config = megatron_config(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=plan.ep,
            expert_tensor_parallel_size=plan.etp,
            sequence_parallel=sequence_parallel,
            **config_kw,
        )
        layer = MoEExtLayer(config, plan=plan, groups=groups, experts_backend="loop")
        from moe_ext.moe.layer import expert_shard

        gate_up, down = expert_shard(
            full["experts.gate_up_proj"], full["experts.down_proj"], layer.dispatcher
        )
        state = dict(full, **{"experts.gate_up_proj": gate_up, "experts.down_proj": down})
        layer.load_state_dict(state)
        # TP ranks see the same tokens, except under sequence parallelism; the reference
        # runs each rank's own tokens (the layer is per token)
        seed = 100 + (groups.dp_rank if tp > 1 and not sequence_parallel else rank)
        x = torch.randn(5, 3, H, generator=torch.Generator().manual_seed(seed))
        x.requires_grad_(True)
        y, bias = layer(x)
        assert bias is None and y.shape == x.shape
        (y * torch.linspace(-1, 1, H)).sum().backward()
        x64 = x.detach().double().requires_grad_(True)
        ref.zero_grad()
        y_ref = ref(x64.reshape(-1, H)).reshape(x.shape)
        (y_ref * torch.linspace(-1, 1, H, dtype=torch.float64)).sum().backward()
        where = f"{strategy} tp={tp} sp={sequence_parallel} rank {rank}"
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5, msg=where)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5, msg=where)
        # replicated router: every rank's gradient is the full one for its own tokens
        if tp > 1:
            torch.testing.assert_close(
                layer.router.weight.grad.double(),
                ref.router.weight.grad,
                rtol=1e-4,
                atol=1e-5,
                msg=where,
            )


@pytest.mark.timeout(240)
def test_layer_matches_reference_every_strategy_world2():
    run_ranks(_layer_body, world_size=2)


# ---- multi-rank: GPTModel with our layer vs the native decoder -------------------------


GPT_CASES = [
    ("mixtral", "ep_nccl"),
    ("qwen2_moe", "ep_allgather"),
    ("qwen3_moe", "replicate"),
    ("qwen3_moe", "tp_experts"),
]


def _gpt_body(rank, world):
    from megatron.core.models.gpt import GPTModel

    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron import (
        gpt_model_kwargs,
        install_parallel_state,
        load_into_megatron,
        pg_collection,
        uninstall_parallel_state,
    )
    from moe_ext.model import Transformer

    with megatron_on_cpu():
        for model_type, strategy in GPT_CASES:
            args = megatron_args(model_type)
            tp = 2 if strategy == "tp_experts" else 1
            plan = megatron_plan(strategy, world, tp)
            groups = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
            install_parallel_state(groups)
            try:
                config = TransformerConfig(
                    **transformer_config_kwargs(args, plan, use_cpu_initialization=True)
                )
                spec = get_gpt_decoder_block_spec(config, plan, groups)
                model = GPTModel(
                    config, spec, pg_collection=pg_collection(groups), **gpt_model_kwargs(args)
                ).eval()
                full = init_random_full(args)
                load_into_megatron(model, native_to_megatron(full, args, plan, groups))
                native = Transformer(args).eval()
                native.load_state_dict(full)
                seed = 11 + (groups.dp_rank if tp > 1 else rank)
                tokens = torch.randint(
                    0, args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(seed)
                )
                positions = torch.arange(6)[None].expand(2, 6)
                mask = torch.triu(torch.ones(6, 6), 1).bool()[None, None]  # True = hidden
                with torch.no_grad():
                    logits = model(tokens, positions, mask)  # [B, S, V / tp]
                    ref = native(tokens)
                if tp > 1:
                    vocab = args.vocab_size // tp
                    ref = ref[..., groups.tp_rank * vocab : (groups.tp_rank + 1) * vocab]
                torch.testing.assert_close(
                    logits, ref, rtol=1e-4, atol=1e-4, msg=f"{model_type} {strategy} rank {rank}"
                )
            finally:
                uninstall_parallel_state()


@pytest.mark.timeout(240)
def test_gptmodel_with_our_layer_matches_native_decoder_world2():
    run_ranks(_gpt_body, world_size=2)


# ---- init, expert-bias hooks, parallel_state -------------------------------------------


def _state_body(rank, world):
    from megatron.core import parallel_state as ps

    from moe_ext.groups import ProcessGroups
    from moe_ext.megatron import (
        MoEExtLayer,
        ParallelStateError,
        install_parallel_state,
        uninstall_parallel_state,
    )

    plan = megatron_plan("ep_nccl", world)
    groups = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
    install_parallel_state(groups)
    try:
        assert ps.get_expert_model_parallel_group() is groups.ep
        assert ps.get_tensor_model_parallel_group() is groups.tp
        assert ps.get_data_parallel_group() is groups.dp
        assert ps.get_expert_model_parallel_world_size() == 2
        assert ps.get_expert_model_parallel_rank() == groups.ep_rank
        assert ps.model_parallel_is_initialized()
        install_parallel_state(groups)  # idempotent for the same groups
        other = ProcessGroups.build(plan, "gloo", datetime.timedelta(seconds=60))
        with pytest.raises(ParallelStateError):
            install_parallel_state(other)
        # megatron's default pg collection (used when none is passed) is ours
        config = megatron_config(
            expert_model_parallel_size=2,
            perform_initialization=True,
            init_method_std=0.02,
            moe_router_enable_expert_bias=True,
            moe_router_score_function="sigmoid",
        )
        layer = MoEExtLayer(config, pg_collection=None, plan=plan, groups=groups)
        assert layer.num_local_experts == E // 2 and layer.experts.num_experts == E // 2
        assert layer.local_expert_indices[0] == groups.ep_rank * E // 2
        std = layer.router.weight.std().item()
        assert 0.015 < std < 0.025, std  # Megatron's init_method, not ours (H**-0.5 = 0.18)
        assert all(p.allreduce is False for p in layer.experts.parameters())
        assert layer.expert_bias is layer.router.e_score_correction_bias
        layer(torch.randn(4, 2, H))
        assert int(layer.local_tokens_per_expert.sum()) == 4 * 2 * 2
        plain = MoEExtLayer(megatron_config(expert_model_parallel_size=2), plan=plan, groups=groups)
        assert not hasattr(plain, "expert_bias")  # Megatron's bias update skips it
        with pytest.raises(MegatronConfigError, match="expert_model_parallel_size"):
            MoEExtLayer(megatron_config(expert_model_parallel_size=1), plan=plan, groups=groups)
    finally:
        uninstall_parallel_state()
    assert not ps.model_parallel_is_initialized()


@pytest.mark.timeout(120)
def test_parallel_state_from_our_groups_and_layer_hooks_world2():
    run_ranks(_state_body, world_size=2)
