"""tools/calibrate.py on two CPU ranks (gloo, --quick) into a MachineProfile; the
alpha-beta model and the helpers of moe_ext.calibrate against hand-computed values; the
shipped RTX PRO 6000 estimate against its stated sources (docs/PERF.md's P2P-off H200
link, NVIDIA's memory spec).

# S bytes per rank, g group size, busbw GB/s (nccl-tests' bus bandwidth)
"""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch

from moe_ext.calibrate import (
    MIB,
    CalibrationError,
    alpha_beta_seconds,
    bus_bandwidth_gbps,
    calibrate,
    estimated_collectives,
    group_sizes,
    message_sizes,
    monotone,
    skewed_splits,
)
from moe_ext.profile import COLLECTIVES, SHIPPED, MachineProfile
from tests.support import REPO, TOOLS, torchrun


def _seconds_monotone(profile: MachineProfile, op: str, group: int) -> list[float]:
    """profile.seconds on a log grid from below the smallest sample to 4x the largest;
    fails unless it never decreases."""
    samples = profile.collectives[op][str(group)]
    lo, hi = samples[0][0] / 4, samples[-1][0] * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)] + [s for s, _ in samples]
    grid.sort()
    times = [profile.seconds(op, group, n) for n in grid]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(times, times[1:])), (op, group, times)
    # the recorded samples themselves are reproduced
    for s, t in samples:
        assert math.isclose(profile.seconds(op, group, s), t, rel_tol=1e-9), (op, s)
    return times


@pytest.mark.timeout(120)
def test_calibrate_quick_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "profiles" / "cpu.json"  # a folder that does not exist yet
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("NCCL_P2P_DISABLE", None)
    proc = subprocess.run(
        [
            *torchrun(2),
            str(TOOLS / "calibrate.py"),
            "--quick",
            "--device",
            "cpu",
            "--name",
            "test_cpu",
            "--out",
            str(out),
        ],  # fmt: skip
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["cpu.json"]  # no temp file left

    profile = MachineProfile.load(out)
    assert (profile.name, profile.source, profile.link, profile.p2p, profile.gpus) == (
        "test_cpu",
        "measured",
        "cpu",
        False,
        2,
    )
    assert set(profile.collectives) == set(COLLECTIVES)
    for op in COLLECTIVES:
        assert list(profile.collectives[op]) == ["2"], op  # world 2: one group size
        samples = profile.collectives[op]["2"]
        sizes = [s for s, _ in samples]
        assert len(sizes) >= 3 and sizes == sorted(set(sizes)), (op, sizes)
        assert sizes[0] <= 4096 and sizes[-1] >= 1 << 20, (op, sizes)
        assert all(t > 0 and math.isfinite(t) for _, t in samples), (op, samples)
        for s, t in samples:
            bw = bus_bandwidth_gbps(op, 2, s, t)
            assert math.isfinite(bw) and bw > 0, (op, s, t)
        # a collective through loopback TCP is not faster than 1 us nor slower than 10 s
        assert 1e-6 < samples[0][1] and samples[-1][1] < 10, (op, samples)
        _seconds_monotone(profile, op, 2)
    for field in ("hbm_gbps", "matmul_tflops", "gemv_efficiency", "grouped_efficiency"):
        value = getattr(profile, field)
        assert math.isfinite(value) and value > 0, (field, value)
    assert 0 < profile.kernel_overhead_us < 1000 and profile.graph_kernel_us is None  # CPU
    assert profile.graph_collectives == {}  # CUDA graphs only
    assert "graph_collectives: not measured (CPU)" in profile.notes
    assert any(n.startswith("command: torchrun --nproc-per-node 2 ") for n in profile.notes)
    assert any(torch.__version__ in n for n in profile.notes), profile.notes
    # rank 0's summary: one row per op at g = 2, then the kernel rates
    table = proc.stdout.split("test_cpu:", 1)[1]
    for op in COLLECTIVES:
        assert f"{op}  2" in table.replace("   ", "  "), table
    assert "hbm" in table and f"wrote {out}" in proc.stdout


@pytest.mark.gpu
def test_calibrate_quick_on_two_gpus_times_collectives_inside_graphs(tmp_path):
    """On 2 GPUs the profile also holds decode's collectives timed inside a CUDA graph: each
    op of GRAPH_OPS at g = 2, sizes up to GRAPH_MAX_BYTES, no slower than the eager call at
    the smallest size (the graph drops the host dispatch), and read back by seconds()."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from moe_ext.calibrate import GRAPH_MAX_BYTES, GRAPH_OPS

    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [*torchrun(2), str(TOOLS / "calibrate.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = MachineProfile.load(out)
    assert set(profile.graph_collectives) == set(GRAPH_OPS)
    for op in GRAPH_OPS:
        samples = profile.graph_collectives[op]["2"]
        assert samples[-1][0] <= GRAPH_MAX_BYTES and len(samples) >= 3, (op, samples)
        assert all(0 < t < 1e-2 for _, t in samples), (op, samples)
        smallest = samples[0][0]
        assert profile.seconds(op, 2, smallest, in_graph=True) <= profile.seconds(op, 2, smallest)
    assert f"{GRAPH_OPS[0]} (graph)" in proc.stdout


def test_one_rank_is_refused_in_one_line():
    with pytest.raises(CalibrationError, match="at least 2 ranks.*torchrun --nproc-per-node 2"):
        calibrate(None, 0, 1, torch.device("cpu"), topology=None, p2p_disabled=False)


# ---- the model and helpers, against hand-computed values ---------------------------------


@pytest.mark.parametrize(
    "op, g, expected_bus_bytes",
    [
        ("all_reduce", 4, 1.5e6),  # 2 (g-1)/g S
        ("all_to_all", 4, 0.75e6),  # (g-1)/g S
        ("reduce_scatter", 2, 0.5e6),  # (g-1)/g S
        ("all_gather", 4, 3e6),  # (g-1) S: S is the shard
        ("send_recv", 8, 1e6),
    ],
)
def test_alpha_beta_ring_factors(op, g, expected_bus_bytes):
    t = alpha_beta_seconds(op, g, 1e6, alpha_s=10e-6, busbw_gbps=10.0)
    assert t == pytest.approx(10e-6 + expected_bus_bytes / 10e9, rel=1e-12)
    assert bus_bandwidth_gbps(op, g, 1e6, t - 10e-6) == pytest.approx(10.0, rel=1e-12)


def test_sizes_groups_splits():
    assert message_sizes(256 * MIB) == [4096 * 4**i for i in range(9)]
    assert message_sizes(1000 * 1024, step=16) == [4096, 65536, 1000 * 1024]
    assert group_sizes(1) == [] and group_sizes(2) == [2] and group_sizes(8) == [2, 4, 8]
    assert group_sizes(6) == [2, 6] and group_sizes(12) == [2, 4, 12]
    for numel, g in ((1000, 2), (4096, 4), (1001, 3), (7, 8)):
        counts = skewed_splits(numel, g)
        assert sum(counts) == numel and len(counts) == g and min(counts) >= 0
        assert counts == sorted(counts)  # rising with the destination
    c = skewed_splits(4000, 2)
    assert c == [1500, 2500]  # 0.75 and 1.25 of the mean 2000
    c = skewed_splits(8000, 5)
    assert c == [1200, 1400, 1600, 1800, 2000]  # mean 1600
    assert monotone([[1, 3.0], [2, 2.0], [4, 5.0], [8, 4.0], [16, 9.0]]) == [
        [1, 2.0],
        [2, 2.0],
        [4, 4.0],
        [8, 4.0],
        [16, 9.0],
    ]  # a slow small size takes the next larger one's time; the largest stays


# ---- the shipped estimate ----------------------------------------------------------------

ESTIMATE = SHIPPED / "rtxpro6000x4_pcie5.json"
# docs/PERF.md "Link floors": 2x H200, NCCL_P2P_DISABLE=1, all_to_all busbw at 256 MB,
# 22-24 GB/s over runs, 28-41 us at 64 KB; NVIDIA's RTX PRO 6000 memory spec: 1792 GB/s
H200_P2P_OFF_A2A_GBPS = (22.0, 24.0)
H200_P2P_OFF_LATENCY_S = (28e-6, 41e-6)
RTX_PRO_6000_SPEC_GBPS = 1792.0


def test_rtx_pro_6000_estimate_loads_with_sane_numbers():
    p = MachineProfile.load(ESTIMATE)
    assert (p.name, p.source, p.gpus, p.link, p.p2p) == (
        "rtxpro6000x4_pcie5",
        "estimate",
        4,
        "pcie",
        False,
    )
    assert 0.7 * RTX_PRO_6000_SPEC_GBPS <= p.hbm_gbps <= RTX_PRO_6000_SPEC_GBPS
    assert 250 <= p.matmul_tflops <= 504  # at most the dense BF16 spec (503.8)
    assert 0.2 <= p.gemv_efficiency <= 1 and 0.3 <= p.grouped_efficiency <= 1
    assert 1 <= p.kernel_overhead_us <= 20 and 0.5 <= p.graph_kernel_us <= p.kernel_overhead_us
    assert set(p.collectives) == set(COLLECTIVES)
    for op in COLLECTIVES:
        assert set(p.collectives[op]) == {"2", "4"}, op
        for g in (2, 4):
            samples = p.collectives[op][str(g)]
            (s0, t0), (s1, t1) = samples[0], samples[-1]
            assert s0 <= 4096 and s1 >= 256 * MIB
            assert 20e-6 <= t0 <= 50e-6, (op, g, t0)  # host-staged latency
            assert 15 <= bus_bandwidth_gbps(op, g, s1, t1) <= 25, (op, g)
            _seconds_monotone(p, op, g)
    # group 2 reproduces the measured P2P-off H200 pair (same host-staged Gen5 x16 path)
    bw = bus_bandwidth_gbps("all_to_all", 2, 256e6, p.seconds("all_to_all", 2, 256e6))
    assert H200_P2P_OFF_A2A_GBPS[0] * 0.95 <= bw <= H200_P2P_OFF_A2A_GBPS[1] * 1.05
    lat = p.seconds("all_to_all", 2, 64 * 1024)
    assert H200_P2P_OFF_LATENCY_S[0] <= lat <= H200_P2P_OFF_LATENCY_S[1]
    # four ranks are never faster than two at any size
    for op in COLLECTIVES:
        for s in (4096, MIB, 64 * MIB):
            assert p.seconds(op, 4, s) >= p.seconds(op, 2, s), (op, s)


def test_rtx_pro_6000_estimate_tables_are_the_stated_model():
    """Its notes name the model call; the tables are exactly that call, and every number
    has a note naming its origin."""
    p = MachineProfile.load(ESTIMATE)
    call = "estimated_collectives({2: (35e-6, 24.0), 4: (40e-6, 20.0)}, message_sizes(256 MiB))"
    assert any(call in n for n in p.notes), p.notes
    want = estimated_collectives({2: (35e-6, 24.0), 4: (40e-6, 20.0)}, message_sizes(256 * MIB))
    assert p.collectives == want
    text = " ".join(p.notes)
    for origin in (
        "hbm_gbps 1600",
        "1792 GB/s",
        "matmul_tflops 400",
        "503.8",
        "datasheet",
        "gemv_efficiency 0.37",
        "grouped_efficiency 0.66",
        "kernel_overhead_us 5.0",
        "graph_kernel_us 2.0",
        "NCCL_P2P_DISABLE=1",
        "docs/PERF.md",
    ):
        assert origin in text, origin
