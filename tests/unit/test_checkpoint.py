"""Checkpoint conversion and reading, checked against Hugging Face transformers.

Tiny random models of every family are made with transformers (config -> model ->
``save_pretrained``, which writes the legacy per-expert layout); the same weights are also
written by hand in the fused transformers-5 layout and in the legacy layout split over
several shards with an index. Expert tensors in the tests are built from the model's own
state dict, not through moe_ext's name maps.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_ext.checkpoint import CheckpointError, CheckpointReader, ShardRequest, load_sharded
from moe_ext.checkpoint.convert import export_hf, import_hf, verify
from moe_ext.checkpoint.format import MANIFEST, read_manifest
from moe_ext.checkpoint.hf_maps import native_shapes

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
E = 8  # experts: divisible by the EP=4 of the byte-count test


def _config(family: str):
    common = dict(
        vocab_size=96,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    if family == "mixtral":
        return transformers.MixtralConfig(
            intermediate_size=24, num_hidden_layers=2, num_local_experts=E, **common
        )
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=3,
            mlp_only_layers=[1],
            num_experts=E,
            **common,
        )
    # qwen3_moe: layer 0 dense through decoder_sparse_step, tied embeddings, head_dim != H / nH
    return transformers.Qwen3MoeConfig(
        intermediate_size=40,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        head_dim=16,
        decoder_sparse_step=2,
        tie_word_embeddings=True,
        num_experts=E,
        **common,
    )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (save_pretrained dir, model in eval mode, fused in-memory state dict)."""
    out = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(100 + i)
        model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
        with torch.no_grad():  # non-trivial norms, so a swapped norm tensor shows in the logits
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        d = tmp_path_factory.mktemp(f"hf_{family}")
        model.save_pretrained(d)
        (d / "tokenizer.json").write_text(
            json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}})
        )
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if _config(family).tie_word_embeddings:
            state.pop("lm_head.weight", None)
        out[family] = (d, model, state)
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())


def _legacy_tensors(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused in-memory state dict rewritten by hand with per-expert legacy names."""
    out = {}
    for key, t in state.items():
        m = re.match(
            r"model\.layers\.(\d+)\.mlp\.(experts\.(gate_up_proj|down_proj)|gate\.weight)$", key
        )
        if not m:
            out[key] = t.contiguous()
            continue
        block = f"model.layers.{m.group(1)}." + (
            "block_sparse_moe" if family == "mixtral" else "mlp"
        )
        names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        if m.group(3) is None:
            out[block + ".gate.weight"] = t.contiguous()
        elif m.group(3) == "gate_up_proj":
            f = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{block}.experts.{j}.{names[0]}.weight"] = t[j, :f].contiguous()
                out[f"{block}.experts.{j}.{names[1]}.weight"] = t[j, f:].contiguous()
        else:
            for j in range(t.shape[0]):
                out[f"{block}.experts.{j}.{names[2]}.weight"] = t[j].contiguous()
    return out


def _write_sharded(d: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    keys = sorted(tensors)
    weight_map = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::num_shards]}
        save_file(part, str(d / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _all_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _checksums(d: Path) -> dict[str, tuple]:
    return {n: (e.shape, e.dtype, e.sha256) for n, e in read_manifest(d)["tensors"].items()}


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(ids).logits


def _left_at(dst: Path) -> list[str]:
    """Anything a failed conversion left at or next to ``dst``."""
    return sorted(
        p.name
        for p in dst.parent.iterdir()
        if p.name == dst.name or p.name.startswith(f".{dst.name}.")
    )


# ---- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_bit_exact_and_transformers_loads_export(family, hf_dirs, tmp_path):
    src, model, state = hf_dirs[family]
    ext = tmp_path / "ext"
    import_hf(src, ext, progress=False)
    assert sorted(p.name for p in ext.iterdir()) == sorted(
        [
            "config.json",
            MANIFEST,
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    assert (ext / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (ext / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    manifest = read_manifest(ext)
    assert manifest["family"] == family and manifest["dtype"] == "fp32"
    # native names: stacked experts equal the model's fused transformers-5 parameters
    native = load_file(str(ext / "model.safetensors"))
    assert set(native) == set(native_shapes(json.loads((src / "config.json").read_text())))
    for key, t in state.items():
        name = key.removeprefix("model.").replace(".mlp.gate.weight", ".mlp.router.weight")
        assert torch.equal(native[name], t), name

    per_expert, fused = tmp_path / "per_expert", tmp_path / "fused"
    export_hf(ext, per_expert, progress=False)
    export_hf(
        ext, fused, layout="fused", max_shard_bytes=20_000, progress=False
    )  # several shards + index
    original = _all_tensors(src)
    exported = _all_tensors(per_expert)
    assert exported.keys() == original.keys()
    for key in original:  # bit-exact, dtype included
        assert exported[key].dtype == original[key].dtype and torch.equal(
            exported[key].view(torch.uint8), original[key].view(torch.uint8)
        ), key
    assert (
        len(list(fused.glob("*.safetensors"))) > 1
        and (fused / "model.safetensors.index.json").exists()
    )
    fused_tensors = _all_tensors(fused)
    assert fused_tensors.keys() == state.keys()
    assert all(torch.equal(fused_tensors[k], state[k]) for k in state)

    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    for d in (per_expert, fused):
        torch.testing.assert_close(_logits(d, ids), reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_every_source_layout_gives_the_same_checkpoint(family, hf_dirs, tmp_path):
    """save_pretrained output, hand-written fused v5 names, hand-written legacy names over three
    shards with an index, and a multi-shard export all import to identical tensors."""
    src, _, state = hf_dirs[family]
    fused_src, legacy_src = tmp_path / "fused_src", tmp_path / "legacy_src"
    _copy_side_files(src, fused_src)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(fused_src / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _copy_side_files(src, legacy_src)
    _write_sharded(legacy_src, _legacy_tensors(family, state), num_shards=3)

    import_hf(src, tmp_path / "a", progress=False)
    import_hf(fused_src, tmp_path / "b", progress=False)
    import_hf(legacy_src, tmp_path / "c", progress=False, max_shard_bytes=30_000)
    reference = _checksums(tmp_path / "a")
    assert _checksums(tmp_path / "b") == reference
    assert _checksums(tmp_path / "c") == reference
    assert len(list((tmp_path / "c").glob("model-*-of-*.safetensors"))) > 1
    assert verify(tmp_path / "c", progress=False) == []

    # a multi-shard per-expert export read back through its index
    export_hf(tmp_path / "c", tmp_path / "d_hf", max_shard_bytes=25_000, progress=False)
    assert (tmp_path / "d_hf" / "model.safetensors.index.json").exists()
    import_hf(tmp_path / "d_hf", tmp_path / "d", progress=False)
    assert _checksums(tmp_path / "d") == reference


def test_dtype_cast_bf16(hf_dirs, tmp_path):
    src, model, state = hf_dirs["qwen2_moe"]
    ext = tmp_path / "ext"
    import_hf(src, ext, dtype="bf16", progress=False)
    assert read_manifest(ext)["dtype"] == "bf16"
    reader = CheckpointReader.open(ext)
    gate_up = reader.read("layers.0.mlp.experts.gate_up_proj")
    assert gate_up.dtype == torch.bfloat16
    assert torch.equal(gate_up, state["model.layers.0.mlp.experts.gate_up_proj"].to(torch.bfloat16))
    export_hf(ext, tmp_path / "hf", progress=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.bfloat16
    )
    assert torch.equal(
        loaded.model.layers[2].mlp.experts.down_proj.detach(),
        state["model.layers.2.mlp.experts.down_proj"].to(torch.bfloat16),
    )


# ---- reader --------------------------------------------------------------------------------


def test_shard_request_shapes_and_errors():
    shape = (8, 32, 16)  # [E, 2F, H], F = 16
    tp = ShardRequest.blocks(1, [(4, 8), (20, 24)], outer=(slice(2, 4),))
    assert tp.shape(shape) == (2, 8, 16)
    assert tp.bounds(shape) == [((2, 4), (4, 8), (0, 16)), ((2, 4), (20, 24), (0, 16))]
    assert ShardRequest.full().shape(shape) == shape and ShardRequest.full().is_full(shape)
    assert ShardRequest.block(0, 6, 100).shape(shape) == (2, 32, 16)  # Python slicing clamps
    assert not ShardRequest.block(0, 0, 4).is_full(shape)
    with pytest.raises(CheckpointError, match="step 1"):
        ShardRequest(boxes=((slice(0, 4, 2),),))
    with pytest.raises(CheckpointError, match="disagree on dim 0"):
        ShardRequest(boxes=((slice(0, 2),), (slice(0, 3),)), cat_dim=1).shape(shape)
    with pytest.raises(CheckpointError, match="more dims"):
        ShardRequest(boxes=((slice(None),) * 4,)).shape(shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_views_agree_and_read_exact_slices(family, hf_dirs, tmp_path):
    src, _, state = hf_dirs[family]
    ext = tmp_path / "ext"
    import_hf(src, ext, progress=False)
    config = json.loads((src / "config.json").read_text())
    hf, mx = CheckpointReader.open(src), CheckpointReader.open(ext)
    assert (hf.format, mx.format) == ("hf", "moe_ext")
    assert hf.config == mx.config == config
    assert hf.names() == mx.names() == list(native_shapes(config))
    moe_layer = max(
        i for i in range(config["num_hidden_layers"]) if f"layers.{i}.mlp.router.weight" in hf
    )
    name = f"layers.{moe_layer}.mlp.experts.gate_up_proj"
    full = state[f"model.{name}"]  # [E, 2F, H]
    E_, two_f, H = full.shape
    F = two_f // 2
    assert hf.shape(name) == mx.shape(name) == (E_, two_f, H)
    # TP=2 shard 1 of experts 2..5: gate rows and up rows sliced, concatenated gate-then-up
    req = ShardRequest.blocks(1, [(F // 2, F), (F + F // 2, 2 * F)], outer=(slice(2, 6),))
    expected = torch.cat([full[2:6, F // 2 : F], full[2:6, F + F // 2 :]], dim=1)  # [4, F, H]
    for reader in (hf, mx):
        reader.bytes_read = 0
        got = reader.read(name, req)
        assert torch.equal(got, expected) and got.is_contiguous()
        assert reader.bytes_read == expected.numel() * 4
    down = state[f"model.layers.{moe_layer}.mlp.experts.down_proj"]  # [E, H, F]
    req = ShardRequest(boxes=((slice(1, 3), slice(None), slice(0, F // 2)),))  # etp column block
    assert torch.equal(
        hf.read(f"layers.{moe_layer}.mlp.experts.down_proj", req), down[1:3, :, : F // 2]
    )
    loaded = load_sharded(
        src,
        {"norm.weight": ShardRequest.full(), name: ShardRequest.block(0, 0, 1)},
        dtype=torch.float64,
        progress=False,
    )
    assert loaded[name].dtype == torch.float64 and torch.equal(loaded[name], full[:1].double())
    with pytest.raises(CheckpointError, match="not in checkpoint"):
        load_sharded(ext, {"layers.0.mlp.experts.nope": ShardRequest.full()}, progress=False)


@pytest.mark.parametrize("fmt", ["hf", "moe_ext"])
def test_ep4_rank_reads_a_quarter_of_the_expert_bytes(fmt, hf_dirs, tmp_path):
    src, _, _ = hf_dirs["mixtral"]
    directory = src
    if fmt == "moe_ext":
        directory = tmp_path / "ext"
        import_hf(src, directory, progress=False)
    probe = CheckpointReader.open(directory)
    experts = [n for n in probe.names() if ".mlp.experts." in n]
    expert_bytes = sum(probe.nbytes(n) for n in experts)
    other_bytes = sum(probe.nbytes(n) for n in probe.names() if n not in experts)
    ep = 4
    parts = {}
    for rank in range(ep):
        reader = CheckpointReader.open(directory)
        lo, hi = rank * E // ep, (rank + 1) * E // ep
        requests = {
            n: ShardRequest.block(0, lo, hi) if n in experts else ShardRequest.full()
            for n in reader.names()
        }
        parts[rank] = load_sharded(reader, requests, progress=False)
        assert reader.bytes_read == expert_bytes // ep + other_bytes
    full = CheckpointReader.open(directory)
    for n in experts:  # the four ranks' blocks tile the full tensor
        assert torch.equal(torch.cat([parts[r][n] for r in range(ep)]), full.read(n))


def test_streaming_peak_memory(tmp_path):
    """Importing an ~80 MB legacy checkpoint raises peak RSS by about one tensor, not the model."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from safetensors.torch import save_file
        from moe_ext.checkpoint.convert import import_hf
        L, H, E, F, V = 6, 256, 16, 256, 512
        config = dict(model_type="qwen3_moe", vocab_size=V, hidden_size=H, intermediate_size=F,
                      moe_intermediate_size=F, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, num_experts=E, num_experts_per_tok=2)
        src = Path(sys.argv[1]) / "src"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(config))
        g = torch.Generator().manual_seed(0)
        for i in range(L):  # one shard per layer, so building the source stays small too
            p = f"model.layers.{{i}}."
            t = {{p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H),
                 p + "self_attn.q_proj.weight": torch.randn(256, H, generator=g),
                 p + "self_attn.k_proj.weight": torch.randn(128, H, generator=g),
                 p + "self_attn.v_proj.weight": torch.randn(128, H, generator=g),
                 p + "self_attn.o_proj.weight": torch.randn(H, 256, generator=g),
                 p + "self_attn.q_norm.weight": torch.ones(64), p + "self_attn.k_norm.weight": torch.ones(64),
                 p + "mlp.gate.weight": torch.randn(E, H, generator=g)}}
            for j in range(E):
                for part, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
                    t[p + f"mlp.experts.{{j}}.{{part}}.weight"] = torch.randn(*shape, generator=g)
            save_file(t, str(src / f"layer{{i}}.safetensors"))
            del t
        save_file({{"model.embed_tokens.weight": torch.randn(V, H, generator=g), "model.norm.weight": torch.ones(H),
                   "lm_head.weight": torch.randn(V, H, generator=g)}}, str(src / "rest.safetensors"))
        model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        largest = E * 2 * F * H * 4
        import_hf(src, Path(sys.argv[1]) / "warmup", progress=False)  # first-call allocations
        status = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        before = status("VmRSS")
        import_hf(src, Path(sys.argv[1]) / "dst", progress=False)
        print(json.dumps(dict(peak=status("VmHWM") - before, model=model_bytes, largest=largest)))
    """)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak-RSS mark (/proc/self/clear_refs) here")
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["model"] > 70e6
    # peak ~ the file pages of one stacked tensor mapped while it streams, plus one chunk;
    # loading the model at once would add > 80 MB
    assert m["peak"] < 2 * m["largest"] < m["model"] / 4, m


# ---- verify ------------------------------------------------------------------------------


def test_verify_finds_missing_extra_misshapen_and_corrupt(hf_dirs, tmp_path):
    src, _, state = hf_dirs["qwen3_moe"]
    ext = tmp_path / "ext"
    import_hf(src, ext, progress=False)
    assert verify(ext, progress=False) == [] and verify(src, progress=False) == []

    # flip one byte inside tensor data: checksum mismatch naming the tensor
    name = "layers.1.mlp.experts.down_proj"
    raw = bytearray((ext / "model.safetensors").read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    begin = json.loads(raw[8 : 8 + header_len])[name]["data_offsets"][0]
    raw[8 + header_len + begin + 5] ^= 0xFF
    (ext / "model.safetensors").write_bytes(bytes(raw))
    problems = verify(ext, progress=False)
    assert len(problems) == 1 and "checksum mismatch" in problems[0] and name in problems[0]

    # manifest that forgets one tensor and invents another
    manifest = json.loads((ext / MANIFEST).read_text())
    manifest["tensors"] = [t for t in manifest["tensors"] if t["name"] != "norm.weight"]
    manifest["tensors"].append(dict(manifest["tensors"][0], name="layers.9.extra.weight"))
    (ext / MANIFEST).write_text(json.dumps(manifest))
    problems = verify(ext, progress=False)
    assert any("missing tensor norm.weight" in p for p in problems)
    assert any("unexpected tensor layers.9.extra.weight" in p for p in problems)
    assert any(
        "unexpected tensor norm.weight in model.safetensors" in p for p in problems
    )  # in file, not manifest

    # HF directory: one expert missing, one tensor misshapen, one extra
    bad = tmp_path / "bad_hf"
    _copy_side_files(src, bad)
    legacy = _legacy_tensors("qwen3_moe", state)
    del legacy["model.layers.1.mlp.experts.5.up_proj.weight"]
    legacy["model.layers.1.self_attn.k_norm.weight"] = torch.ones(8)
    legacy["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.ones(16, 32)  # expert 8 of 8
    save_file(legacy, str(bad / "model.safetensors"))
    problems = verify(bad, progress=False)
    assert len(problems) == 3, problems
    assert any(
        "missing tensor model.layers.1.mlp.experts.5.up_proj.weight (expert 5 of 8" in p
        for p in problems
    )
    assert any(
        "model.layers.1.self_attn.k_norm.weight" in p and "[8]" in p and "[16]" in p
        for p in problems
    )
    assert any(
        "unexpected tensor model.layers.1.mlp.experts.8.up_proj.weight" in p for p in problems
    )


# ---- bad input ---------------------------------------------------------------------------


def _bad_truncated(src: Path, d: Path) -> str:
    raw = (src / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    return r"model\.safetensors.*truncated or corrupt"


def _bad_corrupt(src: Path, d: Path) -> str:
    (d / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64
    )
    return r"model\.safetensors.*truncated or corrupt"


def _bad_missing_expert(src: Path, d: Path) -> str:
    t = load_file(str(src / "model.safetensors"))
    del t["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(t, str(d / "model.safetensors"))
    return (
        r"missing tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w3\.weight \(expert 3 of 8"
    )


def _bad_shape(src: Path, d: Path) -> str:
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 20
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return r"tensor model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight in model\.safetensors has shape \[24, 32\], config\.json implies \[20, 32\]"


def _bad_index(src: Path, d: Path) -> str:
    t = load_file(str(src / "model.safetensors"))
    _write_sharded(d, t, num_shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    return r"index\.json names shard model-00002-of-00002\.safetensors, which is missing"


def _bad_model_type(src: Path, d: Path) -> str:
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return r"config\.json: unknown model_type 'llama'; supported families: [a-z0-9_, ]*mixtral, qwen2_moe, qwen3_moe"


def _bad_pickle_only(src: Path, d: Path) -> str:
    (d / "pytorch_model.bin").write_bytes(b"not read")
    return r"no \*\.safetensors files .*pytorch_model\.bin: pickle checkpoints are not read"


BAD_INPUTS = {
    "truncated": _bad_truncated,
    "corrupt": _bad_corrupt,
    "missing_expert": _bad_missing_expert,
    "shape_vs_config": _bad_shape,
    "index_missing_shard": _bad_index,
    "unknown_model_type": _bad_model_type,
    "pickle_only": _bad_pickle_only,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_and_leaves_nothing(case, hf_dirs, tmp_path):
    src, _, _ = hf_dirs["mixtral"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    pattern = BAD_INPUTS[case](src, bad)
    dst = tmp_path / "out" / "dst"
    dst.parent.mkdir()
    with pytest.raises(CheckpointError, match=pattern) as err:
        import_hf(bad, dst, progress=False)
    assert "\n" not in str(err.value)
    assert _left_at(dst) == []
    problems = verify(bad, progress=False)
    assert problems and re.search(pattern, "\n".join(problems))


def test_failure_mid_write_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    """A read that fails after shards were started still leaves nothing at the destination,
    and an existing destination survives a failed --force run."""
    src, _, _ = hf_dirs["mixtral"]
    calls = {"n": 0}
    original = CheckpointReader._read_leaf

    def failing(self, leaf, bounds):
        calls["n"] += 1
        if calls["n"] == 30:
            raise CheckpointError(f"cannot read tensor {leaf.key} (injected)")
        return original(self, leaf, bounds)

    monkeypatch.setattr(CheckpointReader, "_read_leaf", failing)
    dst = tmp_path / "out" / "ext"
    dst.parent.mkdir()
    with pytest.raises(CheckpointError, match="injected"):
        import_hf(src, dst, progress=False)
    assert _left_at(dst) == []
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    calls["n"] = 0
    with pytest.raises(CheckpointError, match="injected"):
        import_hf(src, dst, force=True, progress=False)
    assert _left_at(dst) == ["ext"] and (dst / "keep.txt").exists()


def test_destination_rules(hf_dirs, tmp_path):
    src, _, _ = hf_dirs["qwen2_moe"]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"destination .*dst exists; pass --force"):
        import_hf(src, dst, progress=False)
    assert (dst / "keep.txt").exists()
    import_hf(src, dst, force=True, progress=False)
    assert not (dst / "keep.txt").exists() and verify(dst, progress=False) == []
    assert _left_at(dst) == ["dst"]
    with pytest.raises(CheckpointError, match="overlaps the source"):
        import_hf(src, src / "inside", force=True, progress=False)
    with pytest.raises(CheckpointError, match="already a moe_ext checkpoint"):
        import_hf(dst, tmp_path / "again", progress=False)
    with pytest.raises(CheckpointError, match="--dtype int8 is not supported"):
        import_hf(src, tmp_path / "x", dtype="int8", progress=False)


# ---- CLI -----------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    # cwd="/" shows the tool finds moe_ext from its own location, without installing
    return subprocess.run(
        [sys.executable, str(TOOL), *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


def test_cli_import_verify_export(hf_dirs, tmp_path):
    src, _, _ = hf_dirs["qwen3_moe"]
    ext, out = tmp_path / "ext", tmp_path / "hf"
    res = _cli("import-hf", str(src), str(ext), "--dtype", "fp16")
    assert res.returncode == 0, res.stderr
    assert read_manifest(ext)["dtype"] == "fp16"
    res = _cli("verify", str(ext))
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr
    res = _cli("import-hf", str(src), str(ext))
    assert (
        res.returncode == 1
        and res.stderr.strip() == f"error: destination {ext} exists; pass --force to overwrite it"
    )
    res = _cli("export-hf", str(ext), str(out), "--layout", "fused")
    assert res.returncode == 0, res.stderr
    assert (
        load_file(str(out / "model.safetensors"))["model.layers.1.mlp.experts.gate_up_proj"].dtype
        == torch.float16
    )
    # verify on a broken moe_ext dir: exit 1 and one line per problem
    manifest = json.loads((ext / MANIFEST).read_text())
    manifest["tensors"] = manifest["tensors"][2:]
    (ext / MANIFEST).write_text(json.dumps(manifest))
    res = _cli("verify", str(ext))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1
    assert sum(line.startswith("error: missing tensor") for line in lines) == 2
    assert (
        sum(line.startswith("error: unexpected tensor") for line in lines) == 2
    )  # still in the file
