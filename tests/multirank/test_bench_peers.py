"""Benchmark peers (moe_ext.bench.peers): DeepSpeed's MoE and Megatron-core's MoELayer at
EP = 2 against a dense single-rank float64 computation of the same experts, with their own
routing and with forced balanced routing (CPU/gloo; Megatron with its allgather dispatcher,
as the alltoall one needs CUDA streams; both again on 2 GPUs with NCCL, Megatron alltoall,
marked gpu); tools/bench_moe.py --peers as smoke runs on 2 and 4 ranks. The transformers
peer and tools/bench_infer.py --peers hf: tests/unit/test_bench_peers.py.

# T tokens, H hidden, F expert FFN size, E experts, k top-k
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.support import REPO, megatron_on_cpu, run_ranks, torchrun

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

H, FFN, E, TOP_K, T = 16, 8, 4, 2, 10


def _dense_reference(x, weights, expert_idx, experts):
    """y[T, H] = sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) in float64; ``experts`` are
    (gate[F, H], up[F, H], down[H, F]) per global expert."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(expert_idx.shape[1]):
            gate, up, down = (w.double() for w in experts[int(expert_idx[t, j])])
            xt = x[t].double()
            y[t] += weights[t, j].double() * (down @ (F.silu(gate @ xt) * (up @ xt)))
    return y


def _all_experts(local: list[tuple]) -> list[tuple]:
    """Every rank's local experts, in global order (rank r owns [r*E/ep, (r+1)*E/ep))."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, [tuple(w.detach().cpu().clone() for w in e) for e in local])
    return [e for rank_experts in out for e in rank_experts]


def _balanced_idx(rank: int) -> torch.Tensor:
    pairs = torch.arange(T * TOP_K) + rank * T * TOP_K
    return ((pairs % 2) * (E // 2) + (pairs // 2) % (E // 2)).view(T, TOP_K)  # [T, k]


def _device(rank: int, backend: str) -> torch.device:
    if backend == "nccl":
        # float32 comparisons: keep cuBLAS off TF32 whatever a library set
        torch.backends.cuda.matmul.allow_tf32 = False
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _check_peer(peer, local_experts, rank, device):
    """Peer output for its own routing vs the dense reference; returns (x, idx, y) of a
    forced balanced routing for the caller to check (CPU tensors)."""
    all_experts = _all_experts(local_experts)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(30 + rank))
    with torch.no_grad():
        routed = peer.router(x.to(device))
        y = peer(x.to(device)).cpu()
    ref = _dense_reference(x, routed.weights.cpu(), routed.expert_idx.cpu(), all_experts)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    idx = _balanced_idx(rank)
    peer.force_routing(idx.to(device))
    with torch.no_grad():
        y_forced = peer(x.to(device)).cpu()
    return x, idx, y_forced, all_experts


# ---- DeepSpeed ---------------------------------------------------------------------------


def _deepspeed_body(rank, world, backend="gloo"):
    from moe_ext.bench.peers import deepspeed_peer

    device = _device(rank, backend)
    torch.manual_seed(100 + rank)
    peer = deepspeed_peer(H, FFN, E, TOP_K, dtype=torch.float32, device=device, timeout_s=60)
    local = [
        (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)
        for e in peer.moe.deepspeed_moe.experts.deepspeed_experts
    ]
    assert len(local) == E // world
    x, idx, y_forced, all_experts = _check_peer(peer, local, rank, device)
    # DeepSpeed's forced weights: its softmax gates at the forced experts, renormalised
    logits = x @ peer._gate.wg.weight.cpu().t()  # [T, E]
    chosen = torch.softmax(logits, -1).gather(1, idx)
    ref = _dense_reference(x, chosen / chosen.sum(-1, keepdim=True), idx, all_experts)
    torch.testing.assert_close(y_forced.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(120)
def test_deepspeed_peer_matches_dense_reference_world2():
    pytest.importorskip("deepspeed")
    run_ranks(_deepspeed_body, world_size=2)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_deepspeed_peer_matches_dense_reference_2gpus():
    run_ranks(_deepspeed_body, world_size=2, args=("nccl",), backend="nccl")


# ---- Megatron-core -----------------------------------------------------------------------


def _megatron_body(rank, world, backend="gloo", dispatcher="allgather"):
    from moe_ext.bench.peers import megatron_peer

    device = _device(rank, backend)
    torch.manual_seed(200 + rank)
    with megatron_on_cpu(hide_cuda=True) if backend == "gloo" else contextlib.nullcontext():
        try:
            peer = megatron_peer(
                H,
                FFN,
                E,
                TOP_K,
                dispatcher=dispatcher,
                dtype=torch.float32,
                device=device,
                timeout_s=60,
            )
        except (RuntimeError, AssertionError) as err:
            if "CUDA" in str(err):
                pytest.skip(f"this megatron-core builds CUDA-only state in MoELayer: {err}")
            raise
        local = []
        for expert in peer.layer.experts.local_experts:
            fc1 = expert.linear_fc1.weight  # [2F, H]: gate rows then up rows
            local.append((fc1[:FFN], fc1[FFN:], expert.linear_fc2.weight))
        x, idx, y_forced, all_experts = _check_peer(peer, local, rank, device)
        ref = _dense_reference(x, torch.full((T, TOP_K), 1.0 / TOP_K), idx, all_experts)
        torch.testing.assert_close(y_forced.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(120)
def test_megatron_peer_matches_dense_reference_world2():
    pytest.importorskip("megatron.core")
    try:
        run_ranks(_megatron_body, world_size=2)
    except AssertionError as err:
        if "Skipped" in str(err):
            pytest.skip(str(err).splitlines()[-1])
        raise


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_megatron_peer_matches_dense_reference_2gpus(dispatcher):
    run_ranks(_megatron_body, world_size=2, args=("nccl", dispatcher), backend="nccl")


# ---- tools smoke runs --------------------------------------------------------------------


# bench_moe.py on CPU with a layer small enough for a smoke run
TINY_LAYER_ON_CPU = (
    "--device cpu --dtype fp32 --shape custom --hidden 32 --ffn 16 --experts 4 --topk 2".split()
)


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.slow  # the tool end to end (9 s); the peers' layers are checked above
@pytest.mark.timeout(180)
def test_bench_moe_with_peers_world2_smoke(tmp_path):
    out = tmp_path / "moe.json"
    cmd = [
        *torchrun(2),
        "tools/bench_moe.py",
        *TINY_LAYER_ON_CPU,
        "--tokens",
        "4,8",
        "--strategies",
        "ep_nccl",
        "--peers",
        "megatron,deepspeed",
        "--uniform-routing",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--timeout-s",
        "60",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=170)
    rows = json.loads(out.read_text())["rows"]
    by = {(r["strategy"], r["tokens"]): r for r in rows}
    assert set(by) == {
        (s, t) for s in ("ep_nccl", "mcore_a2a", "mcore_ag", "deepspeed") for t in (4, 8)
    }, proc.stdout + proc.stderr
    for strategy in ("ep_nccl", "deepspeed"):
        for t in (4, 8):
            assert by[(strategy, t)]["status"] == "ok", by[(strategy, t)]
            assert by[(strategy, t)]["median_us"] > 0
    for r in rows:  # versions in every row, failed peers included
        assert set(r["versions"]) == {"torch", "megatron-core", "deepspeed", "transformers"}
    # Megatron's MoELayer is CUDA-only here: its rows say why, and the final table still
    # lists every strategy (the run exits 1 for the failed peer, 0 if it ran)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    table = proc.stdout.split("\n\n")[-1]
    assert all(s in table for s in ("ep_nccl", "mcore_a2a", "mcore_ag", "deepspeed")), table


@pytest.mark.timeout(180)
@pytest.mark.slow  # 14 s; the world-size smoke runs by default
def test_bench_moe_expert_groups_below_world_size(tmp_path):
    """World 4, --group-size 2: two EP-2 (expert-TP-2) groups side by side; each rank holds
    and reads half the experts (half the FFN); peers, which need G = W, say so."""
    out = tmp_path / "moe.json"
    cmd = [
        *torchrun(4),
        "tools/bench_moe.py",
        *TINY_LAYER_ON_CPU,
        "--tokens",
        "8",
        "--strategies",
        "replicate,tp_experts,ep_nccl",
        "--peers",
        "deepspeed",
        "--group-size",
        "2",
        "--uniform-routing",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--timeout-s",
        "60",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    assert {s: (by[s]["world"], by[s]["group"]) for s in by} == {
        "replicate": (4, 1),
        "tp_experts": (4, 2),
        "ep_nccl": (4, 2),
        "deepspeed": (4, 2),
    }
    assert by["deepspeed"]["status"].startswith("skipped: peers run EP = world size 4")
    assert by["replicate"]["experts_read"] == 4 and by["ep_nccl"]["experts_read"] == 2
    full = by["replicate"]["mem_floor_us"]
    for strategy in ("tp_experts", "ep_nccl"):
        assert by[strategy]["status"] == "ok", by[strategy]
        assert by[strategy]["mem_floor_us"] == pytest.approx(full / 2)
    assert re.search(r"ep_nccl\s+4\s+2\s", proc.stdout.split("\n\n")[-1])  # W, G columns

    bad = subprocess.run(
        [sys.executable, "tools/bench_moe.py", "--device", "cpu", "--group-size", "3"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "--group-size 3 does not divide the world size 1; pass a divisor of 1"
    )
