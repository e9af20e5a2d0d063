"""gpt_oss checkpoints: transformers' fused, transposed, gate/up-interleaved experts read
into the native layout (lazily, a rank's slice only), import-hf / export-hf bit-exact both
ways, transformers loads the export with identical logits, and the layouts the engine does
not take (per-expert tensors, MXFP4 blocks, a quantization_config) are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moe_ext.checkpoint import CheckpointError, CheckpointReader
from moe_ext.checkpoint.convert import export_hf, import_hf
from moe_ext.checkpoint.reader import load_sharded
from moe_ext.checkpoint.shard import ShardRequest
from moe_ext.model import ModelArgs, Transformer
from moe_ext.model.parallelize import RankCoords, shard_slices, take_shard
from moe_ext.plan import ParallelPlan
from tests.support import gpt_oss_hf_model as hf_model
from tests.support import gpt_oss_native_state as native_state
from tests.support import safetensors_dir

transformers = pytest.importorskip("transformers")

LOCAL = "moe_ext.moe.dispatch.local.LocalDispatcher"
SHARDED = "moe_ext.moe.dispatch.tp_sharded.TPShardedDispatcher"
A2A = "moe_ext.moe.dispatch.nccl_a2a.AllToAllDispatcher"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_ckpt")
    model = hf_model(seed=4)
    model.save_pretrained(root / "hf")
    return root, model


def test_reader_gives_the_native_layout(saved):
    root, model = saved
    expected = native_state(model.state_dict())
    with CheckpointReader.open(root / "hf") as reader:
        assert sorted(reader.names()) == sorted(expected)  # (HF lists layers in another order)
        for name, tensor in expected.items():
            assert torch.equal(reader.read(name), tensor), name


def test_sliced_loading_reads_only_the_ranks_bytes(saved):
    """EP rank 1 of 2 reads experts 4..7 only; expert-TP rank 1 of 2 reads its F columns of
    gate and up (adjacent in the interleaved layout: one read) and of down."""
    root, model = saved
    full = native_state(model.state_dict())
    args = ModelArgs.from_hf_config(model.config.to_dict())
    for plan in (
        ParallelPlan(
            strategy="ep_nccl",
            world_size=2,
            tp=1,
            pp=1,
            dp=2,
            ep=2,
            etp=1,
            edp=1,
            dispatcher=A2A,
            reason="test",
        ),
        ParallelPlan(
            strategy="tp_experts",
            world_size=2,
            tp=2,
            pp=1,
            dp=1,
            ep=1,
            etp=2,
            edp=1,
            dispatcher=SHARDED,
            reason="test",
        ),
    ):
        requests = shard_slices(plan, RankCoords.of(plan, 1), args)
        experts = {n: r for n, r in requests.items() if ".mlp.experts." in n}
        reader = CheckpointReader.open(root / "hf")
        got = load_sharded(reader, experts, progress=False)
        for name, request in experts.items():
            assert torch.equal(got[name], take_shard(full[name], request)), (plan.strategy, name)
        wanted = sum(t.numel() * t.element_size() for t in got.values())
        assert reader.bytes_read == wanted, plan.strategy
        assert wanted * 2 == sum(full[n].numel() * 4 for n in experts) + (
            # down biases stay whole on expert-TP ranks
            sum(full[n].numel() * 4 for n in experts if n.endswith("down_proj_bias"))
            if plan.etp == 2
            else 0
        )


def test_import_export_round_trip_is_bit_exact(saved):
    root, model = saved
    import_hf(root / "hf", root / "ext", progress=False)
    native = safetensors_dir(root / "ext")
    for name, tensor in native_state(model.state_dict()).items():
        assert torch.equal(native[name], tensor), name
    for layout in ("per-expert", "fused"):  # gpt_oss has one expert layout: both write it
        export_hf(root / "ext", root / f"back_{layout}", layout=layout, progress=False)
        original, back = safetensors_dir(root / "hf"), safetensors_dir(root / f"back_{layout}")
        assert sorted(back) == sorted(original)
        for name, tensor in original.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # a moe_ext checkpoint re-imported from the export is the same checkpoint
    import_hf(root / "back_fused", root / "ext2", progress=False)
    again = safetensors_dir(root / "ext2")
    assert all(torch.equal(again[n], t) for n, t in native.items())


def test_transformers_loads_the_export_with_identical_logits(saved):
    root, model = saved
    if not (root / "back_fused").exists():
        import_hf(root / "hf", root / "ext_l", progress=False)
        export_hf(root / "ext_l", root / "back_fused", progress=False)
    loaded = transformers.GptOssForCausalLM.from_pretrained(root / "back_fused").eval()
    ids = torch.randint(2, 128, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_engine_loads_the_checkpoint_like_transformers(saved):
    """The launcher's weight path (shard_slices -> load_sharded -> load_state_dict)."""
    root, model = saved
    args = ModelArgs.from_hf_config(json.loads((root / "hf" / "config.json").read_text()))
    plan = ParallelPlan(
        strategy="replicate",
        world_size=1,
        tp=1,
        pp=1,
        dp=1,
        ep=1,
        etp=1,
        edp=1,
        dispatcher=LOCAL,
        reason="test",
    )
    requests = shard_slices(plan, RankCoords.of(plan, 0), args)
    ours = Transformer(args).eval()
    ours.load_state_dict(load_sharded(root / "hf", requests, progress=False), strict=True)
    ids = torch.randint(2, 128, (1, 15), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).logits, rtol=1e-5, atol=1e-5)


# ---- layouts the engine does not take -----------------------------------------------------


def _variant(saved, tmp_path: Path, edit) -> Path:
    root, _ = saved
    directory = tmp_path / "variant"
    directory.mkdir()
    config = json.loads((root / "hf" / "config.json").read_text())
    tensors = safetensors_dir(root / "hf")
    edit(config, tensors)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _per_expert(config, tensors):
    gate_up = tensors.pop("model.layers.1.mlp.experts.gate_up_proj")  # [E, H, 2F]
    for j in range(gate_up.shape[0]):
        prefix = f"model.layers.1.mlp.experts.{j}."
        tensors[prefix + "gate_proj.weight"] = gate_up[j, :, 0::2].T.contiguous()
        tensors[prefix + "up_proj.weight"] = gate_up[j, :, 1::2].T.contiguous()


def _mxfp4(config, tensors):
    gate_up = tensors.pop("model.layers.0.mlp.experts.gate_up_proj")
    tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(
        gate_up.shape[0], gate_up.shape[2], 2, 16, dtype=torch.uint8
    )


def _quantized_config(config, tensors):
    config["quantization_config"] = {"quant_method": "mxfp4"}


def _untransposed(config, tensors):  # the native [E, 2F, H] stored as if it were gpt-oss'
    name = "model.layers.2.mlp.experts.gate_up_proj"
    tensors[name] = tensors[name].transpose(1, 2).contiguous()


@pytest.mark.parametrize(
    "edit, message",
    [
        (_per_expert, "gpt_oss checkpoints store experts fused"),
        (_mxfp4, "gate_up_proj_blocks in model.safetensors is an MXFP4 part, but"),
        (_quantized_config, "down_proj has 48 input columns, not a multiple of 32"),
        (_untransposed, "has shape [8, 96, 64], config.json implies [8, 64, 96]"),
    ],
)
def test_unknown_expert_layout_is_one_line(saved, tmp_path, edit, message):
    directory = _variant(saved, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        CheckpointReader.open(directory)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_request_box_reads_stored_pairs_once(saved):
    """Gate and up boxes of the same F columns share one stored read."""
    root, model = saved
    full = native_state(model.state_dict())["layers.0.mlp.experts.gate_up_proj"]  # [8, 96, 64]
    request = ShardRequest.blocks(dim=1, ranges=[(10, 20), (58, 68)], outer=(slice(2, 3),))
    reader = CheckpointReader.open(root / "hf")
    got = reader.read("layers.0.mlp.experts.gate_up_proj", request)
    assert torch.equal(got, take_shard(full, request))
    assert reader.bytes_read == got.numel() * 4
