"""tools/bench_train.py on 2 gloo ranks (CPU, the tiny model, fp32): every system runs
launch/train.py's step in one process group and gives a row whose figures follow from its
step times (tokens/s, MFU from moe_ext.cost.train_flops_per_token), and a failing case
becomes an error row on every rank without stopping the next case.

Megatron-core's CUDA-only helpers are redirected to CPU inside the spawned ranks (as
tests/multirank/test_bench_peers.py does); Megatron's alltoall dispatcher (mcore_a2a)
needs CUDA streams, so only its allgather one runs here (the lead's GPU run has both).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("deepspeed")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|DEPRECATED).*")

from tests.support import megatron_on_cpu, run_ranks  # noqa: E402

SMALL = dict(
    model="tiny",
    layers=2,
    micro_batch=2,
    seq_len=16,
    steps=2,
    warmup=1,
    dtype="fp32",
    zero_stage=0,
    grad_clip=1.0,
    lr=1e-3,
    peak_tflops=1.0,
)


def _body(rank, world, cases_and_expect):
    from moe_ext.bench.train import TrainCase, format_table, run_case
    from moe_ext.cost import train_flops_per_token
    from tests.support import tiny_args

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed reads it (torchrun sets it)
    with megatron_on_cpu(hide_cuda=True):
        rows = []
        for kw, expect in cases_and_expect:
            row = run_case(TrainCase(**{**SMALL, **kw}), torch.device("cpu"), "cpu")
            if rank != 0:
                assert row is None
                continue
            rows.append(row)
            assert row.status.startswith(expect), (kw, row.status)
            if expect != "ok":
                assert row.tokens_per_s is None
                continue
            assert row.world == 2 and row.layers == 2 and row.plan
            assert len(row.peak_mem_gib) == 2 and all(m > 0 for m in row.peak_mem_gib)
            assert len(row.params_per_rank) == 2 and min(row.params_per_rank) > 0
            # tokens/s of dp=2 ranks x B x S per slowest median step; MFU from the FLOPs
            tokens = 2 * SMALL["micro_batch"] * SMALL["seq_len"]
            assert math.isclose(row.tokens_per_s, tokens / (row.step_ms / 1e3), rel_tol=1e-9)
            args = tiny_args()
            args.num_hidden_layers = 2
            flops = train_flops_per_token(args, SMALL["seq_len"]).total
            assert math.isclose(row.flops_per_token, flops, rel_tol=1e-9)
            assert math.isclose(row.mfu, row.tokens_per_s * flops / 2e12, rel_tol=1e-9)
            assert row.step_p10_ms <= row.step_ms * 1.0001 or row.step_p90_ms >= row.step_ms
            # a random model of a 260-token vocabulary starts near ln(260) = 5.56
            assert 4.5 < row.first_loss < 7.0 and math.isfinite(row.last_loss), row
        if rank == 0:
            table = format_table(rows)
            assert table.count("\n") == len(rows) + 1


@pytest.mark.slow  # every system of the tool end to end (8 s)
@pytest.mark.timeout(240)
def test_every_system_gives_a_row_world2():
    cases = [
        (dict(system="deepspeed", strategy="ep_nccl"), "ok"),
        (dict(system="ds_moe", strategy="ep"), "ok"),
        (dict(system="megatron", strategy="ep_allgather"), "ok"),
        (dict(system="mcore_ag", strategy="ep"), "ok"),
        # refused before any weight on every rank; the next case still runs together
        (dict(system="deepspeed", strategy="ep_nccl", layers=99), "error: BenchTrainError"),
        (dict(system="deepspeed", strategy="replicate"), "ok"),
    ]
    run_ranks(_body, world_size=2, args=(cases,))
