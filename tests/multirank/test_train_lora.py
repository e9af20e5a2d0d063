"""LoRA on 2 gloo ranks through the DeepSpeed engine vs the single-rank adapted model: the
adapters' reduced gradients under ep_nccl / ep_allgather (expert adapters sharded with their
experts) equal the reference's, the base gets no gradient and does not move while every
adapter element with a gradient does (ZeRO 0, 1 and 2),
the PEFT and merged exports reassemble the EP shards; and launch/train.py fine-tunes with
LoRA on 2 ranks with exact clipping under ZeRO 1 (adapters in PEFT's format, merged model,
memory per rank in the log), over 2 pipeline stages, and on a frozen FP8 base."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
import torch

from moe_ext.model import Transformer
from moe_ext.model.weights import init_random_full
from moe_ext.train.lora import LoraConf, apply_lora, merge_lora_
from tests.support import (
    REPO,
    deepspeed_test_engine,
    groups_per_layout,
    plan_of,
    run_launcher,
    run_ranks,
    sharded_random_model,
    short_train_overrides,
    tiny_args,
)

pytestmark = pytest.mark.multirank

AUX = 0.01
MB, SEQ = 2, 16
CONF = LoraConf(rank=4, alpha=8.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "experts"])


def _global_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.randint(0, 256, (2 * MB, SEQ + 1), generator=gen)  # [dp·B, S+1]


def _full_b(name: str, shape) -> torch.Tensor:
    """A non-zero full B tensor (at init B is zero, and so would be A's gradient)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen) * 0.05


def _set_b(model, full_shapes, ep_rank: int) -> None:
    """Every B of ``model`` from ``_full_b``: projections whole, experts this rank's rows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora." in name and name.rsplit(".", 1)[-1] in ("B", "gate_up_B", "down_B"):
                full = _full_b(name, full_shapes[name])
                rows = param.shape[0]
                piece = (
                    full if ".experts." not in name else full[ep_rank * rows : (ep_rank + 1) * rows]
                )
                param.copy_(piece)


def _reference(args):
    """The full adapted model: gradients of the mean of the two ranks' losses."""
    from moe_ext.deepspeed.engine import CausalLMWithAux

    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    apply_lora(model, CONF)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    _set_b(model, shapes, 0)
    wrapped = CausalLMWithAux(model, AUX).train()
    loss = 0.5 * sum(wrapped(half)[0] for half in _global_batch().split(MB))
    loss.backward()
    return model, shapes


def _body(rank, world, tmp):
    os.environ["LOCAL_RANK"] = str(rank)
    from safetensors.torch import load_file

    from moe_ext.checkpoint.reader import CheckpointReader
    from moe_ext.train.export import PEFT_WEIGHTS, export_moe_ext, export_peft, hf_config

    torch.manual_seed(0)
    args = tiny_args()
    ref, shapes = _reference(args)
    ref_params = dict(ref.named_parameters())
    tmp = Path(tmp)
    if rank == 0:  # the single-rank PEFT export (no communication with one owner)
        export_peft(ref, plan_of("replicate", world=1), 0, str(tmp / "peft_ref"), CONF)
    groups_cache: dict = {}
    for strategy, zero in (("ep_nccl", 0), ("ep_allgather", 1), ("ep_allgather", 2)):
        plan = plan_of(strategy, dp=2, ep=2)
        groups = groups_per_layout(plan, groups_cache, timeout_s=60)
        model, _ = sharded_random_model(args, plan, groups)
        apply_lora(model, CONF, groups.ep_rank)
        _set_b(model, shapes, groups.ep_rank)
        e_local = args.num_experts // plan.ep
        for name, param in model.named_parameters():  # same A as the reference's slice
            if ".lora." in name:
                full = ref_params[name].detach()
                if ".experts." in name:
                    full = full[groups.ep_rank * e_local : (groups.ep_rank + 1) * e_local]
                assert torch.equal(param.detach(), full), name
        base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}
        adapters = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." in n}
        engine = deepspeed_test_engine(
            model, groups, lr=1e-2, micro_batch=MB, zero_stage=zero, aux_loss_coeff=AUX
        )
        mine = _global_batch()[rank * MB : (rank + 1) * MB]
        loss, _, _ = engine(mine)
        engine.backward(loss)
        for name, param in model.named_parameters():
            if ".lora." not in name:
                assert param.grad is None, name
                continue
            if zero:
                continue  # ZeRO keeps the reduced gradients in its partitions
            expected = ref_params[name].grad
            if ".experts." in name:
                expected = expected[groups.ep_rank * e_local : (groups.ep_rank + 1) * e_local]
            torch.testing.assert_close(
                param.grad, expected, rtol=1e-4, atol=2e-6, msg=lambda m: f"{strategy} {name}: {m}"
            )
        engine.step()
        for name, value in base.items():
            assert torch.equal(model.get_parameter(name), value), name
        for name, before in adapters.items():  # every adapter with a gradient moved
            grad = ref_params[name].grad
            if ".experts." in name:
                grad = grad[groups.ep_rank * e_local : (groups.ep_rank + 1) * e_local]
            changed = model.get_parameter(name).detach() != before  # [same shape] bool
            assert torch.equal(changed, changed | (grad != 0)), (strategy, zero, name)
        if strategy == "ep_nccl":  # exports reassemble the EP shards of the adapters
            with torch.no_grad():
                for name, param in model.named_parameters():  # back to the reference's values
                    if ".lora." in name:
                        full = ref_params[name].detach()
                        if ".experts." in name:
                            full = full[groups.ep_rank * e_local : (groups.ep_rank + 1) * e_local]
                        param.copy_(full)
            export_peft(model, plan, rank, str(tmp / "peft_ep"), CONF)
            merge_lora_(model)
            export_moe_ext(model, plan, rank, str(tmp / "merged"), hf_config(args, "byte"))
            torch.distributed.barrier()
            if rank == 0:
                got = load_file(str(tmp / "peft_ep" / PEFT_WEIGHTS))
                want = load_file(str(tmp / "peft_ref" / PEFT_WEIGHTS))
                assert sorted(got) == sorted(want)
                for name in want:
                    assert torch.equal(got[name], want[name]), name
                merge_lora_(ref)
                with CheckpointReader.open(str(tmp / "merged")) as reader:
                    for name, param in ref.named_parameters():
                        torch.testing.assert_close(
                            reader.read(name), param.detach(), rtol=0, atol=1e-6
                        )
            torch.distributed.barrier()


def test_ep_lora_gradients_and_exports_equal_single_rank_reference(tmp_path):
    run_ranks(_body, world_size=2, args=(str(tmp_path),))


def _lora_run(out, *extra):
    return run_launcher(
        REPO / "launch/train.py",
        [
            *short_train_overrides(out, steps=3, save_every=2),
            "strategy.name=ep_nccl",
            "train.zero_stage=1",
            "train.lora.rank=4",
            "train.lora.targets=[q_proj,v_proj,experts]",
            "sample.max_new_tokens=4",
            *extra,
        ],
        nproc=2,
        timeout=240,
    )


@pytest.mark.slow  # the launcher end to end (19 s); adapters' gradients are checked above
def test_launcher_fine_tunes_with_lora_on_two_ranks(tmp_path):
    """Two ranks, ep_nccl, ZeRO 1: adapters exported in PEFT's format, merged model, memory
    per rank in the log; training checkpoints hold only the adapters (the frozen base comes
    back from the run's weights) and resuming from one continues bit for bit."""
    out = tmp_path / "run"
    result = _lora_run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    from moe_ext.train.state import find_checkpoint, load_rank_state

    saved = load_rank_state(find_checkpoint(str(out / "checkpoints/step_00000002")), rank=1)
    assert saved["module_trainable_only"] and saved["module"]
    assert all(".lora" in name or "lora_" in name for name in saved["module"]), list(
        saved["module"]
    )[:5]
    resumed = _lora_run(tmp_path / "resumed", f"resume={out}/checkpoints/step_00000002")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first = json.loads((out / "train_log.json").read_text())["history"]
    again = json.loads((tmp_path / "resumed" / "train_log.json").read_text())["history"]
    assert again[-1]["loss"] == first[-1]["loss"]
    text = result.stdout + result.stderr
    assert "rank 0: LoRA:" in text and "rank 1: LoRA:" in text, text[-3000:]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4
    assert (out / "model" / "config.json").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["history"]) == 3
    assert [line.split(":")[0] for line in log["lora_memory"]] == ["rank 0", "rank 1"]


@pytest.mark.slow
def test_launcher_fine_tunes_with_lora_over_two_pipeline_stages(tmp_path):
    """pp=2: each stage adapts its own layers; the PEFT export gathers both stages'."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = run_launcher(
        REPO / "launch/train.py",
        [
            *short_train_overrides(out, steps=2, micro_batch=4),
            "strategy=replicate",
            "parallel.pp=2",
            "train.pipeline_microbatches=2",
            "train.lora.rank=4",
            "sample.max_new_tokens=4",
        ],
        nproc=2,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    layers = {name.split(".layers.")[1].split(".")[0] for name in tensors}
    assert layers == {str(i) for i in range(tiny_args().num_hidden_layers)}
    assert any(".experts.base_layer.lora_A" in n for n in tensors)
    log = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [1, 2]
    assert (out / "model" / "config.json").is_file()


@pytest.mark.slow
def test_launcher_trains_lora_on_a_frozen_fp8_base(tmp_path):
    """An FP8 checkpoint (the converter's, blocks of 16) fine-tunes with LoRA on 2 ranks
    (ep_nccl): the quantized base stays frozen, the adapters (PEFT format) are the result."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from moe_ext.checkpoint.convert import quantize

    config = transformers.Qwen3MoeConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    torch.manual_seed(0)
    source, target = tmp_path / "src", tmp_path / "fp8"
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(source)
    saved = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(saved, tokenizer="byte")))
    quantize(source, target, "fp8", [16], progress=False)
    out = tmp_path / "run"
    result = run_launcher(
        REPO / "launch/train.py",
        [
            *short_train_overrides(out, steps=2),
            f"checkpoint={target}",
            "strategy.name=ep_nccl",
            "train.lora.rank=4",
            "sample.max_new_tokens=4",
        ],
        nproc=2,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = [t for n, t in tensors.items() if "lora_B" in n]
    assert b and all(t.abs().sum() > 0 for t in b)  # trained from zero
    assert not (out / "model").exists()  # an FP8 base is not merged
    log = json.loads((out / "train_log.json").read_text())
    assert log["export"] == str(out / "adapter")
