"""moe_ext.bench.train and tools/bench_train.py without ranks: the FLOPs per token against
hand counts from the published configs, the model cut, case refusals, the row figures
from per-rank step times, the JSON merge, table and chart, the command line's cases; and
engine=megatron's bf16 settings (check_train_settings, the launcher's dtype rule, the
optimizer config)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tests.support import TOOLS


def _tool():
    spec = importlib.util.spec_from_file_location("bench_train_tool", TOOLS / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- FLOPs per token ---------------------------------------------------------------------


def test_flops_per_token_qwen3_and_mixtral_by_hand():
    from moe_ext.bench.train import bench_model_args
    from moe_ext.cost import train_flops_per_token

    # Qwen3-30B-A3B cut to 4 layers: H 2048, 32 q heads / 4 kv heads of 128, 8 of 128
    # experts of F 768, vocabulary 151936, untied head
    H, L, S = 2048, 4, 2048
    attn = H * 32 * 128 * 2 + H * 4 * 128 * 2  # q, o + k, v
    moe = 8 * 3 * H * 768 + 128 * H  # k experts of gate/up/down + router
    active = L * (attn + moe) + 151936 * H
    flops = train_flops_per_token(bench_model_args("qwen3_30b_a3b", 4), S)
    assert flops.active_params == active
    assert flops.matmul == 6 * active
    assert flops.attention == 12 * L * (32 * 128) * S
    assert abs(flops.total / 1e9 - 3.63) < 0.01  # the "about 3.65 GFLOP per token"
    # Mixtral 8x7B cut to 2 layers: H 4096, 32/8 heads of 128, 2 of 8 experts of 14336
    H, L = 4096, 2
    active = L * (2 * H * H + 2 * H * 1024 + 2 * 3 * H * 14336 + 8 * H) + 32000 * H
    flops = train_flops_per_token(bench_model_args("mixtral_8x7b", 2), S)
    assert flops.active_params == active
    assert flops.attention == 12 * L * H * S


def test_flops_tied_head_sliding_window_and_mla():
    import dataclasses

    from moe_ext.bench.train import bench_model_args
    from moe_ext.cost import train_flops_per_token
    from tests.support import tiny_args

    args = tiny_args()
    untied = train_flops_per_token(args, 64)
    tied = train_flops_per_token(dataclasses.replace(args, tie_word_embeddings=True), 64)
    assert tied.active_params == untied.active_params  # the table multiplies either way
    assert tied.attention == untied.attention == 12 * 4 * (4 * 16) * 64
    # twice the sequence: attention doubles, matmul stays
    longer = train_flops_per_token(args, 128)
    assert longer.attention == 2 * untied.attention and longer.matmul == untied.matmul
    oss = bench_model_args("gpt_oss_20b", 4)
    window = oss.sliding_window
    sliding = sum(t == "sliding_attention" for t in oss.layer_types)
    assert 0 < sliding < oss.num_hidden_layers
    seq = 4 * window
    heads = oss.num_attention_heads * 2 * oss.head_dim * 6
    want = heads * (sliding * window + (oss.num_hidden_layers - sliding) * seq)
    assert train_flops_per_token(oss, seq).attention == want
    mla = bench_model_args("deepseek_v2_lite", 2)
    d_qk = mla.qk_nope_head_dim + mla.head_dim
    assert train_flops_per_token(mla, 32).attention == (
        6 * 32 * mla.num_attention_heads * (d_qk + mla.v_head_dim) * mla.num_hidden_layers
    )


# ---- cases -------------------------------------------------------------------------------


def test_model_cut_and_refusals():
    from moe_ext.bench.train import BenchTrainError, TrainCase, bench_model_args, check_case

    args = bench_model_args("qwen3_30b_a3b", 4)
    assert args.num_hidden_layers == 4 and args.num_experts == 128
    assert bench_model_args("mixtral_8x7b", None).num_hidden_layers == 32
    with pytest.raises(BenchTrainError, match=r"^--layers 99: mixtral_8x7b has 32 layers"):
        bench_model_args("mixtral_8x7b", 99)
    with pytest.raises(BenchTrainError, match="no model config"):
        bench_model_args("nope", 2)
    ok = TrainCase(model="tiny", layers=2, system="deepspeed", strategy="ep_nccl")
    check_case(ok, 2, "cuda")
    bad = [
        (dict(system="nccl"), "unknown system"),
        (dict(system="mcore_a2a"), "EP over all ranks only"),
        (dict(strategy="ep"), "unknown strategy"),
        (dict(dtype="bf16", zero_stage=0), "--zero-stage 1 or 2"),
        (dict(micro_batch=0), "micro_batch=0"),
    ]
    for change, message in bad:
        with pytest.raises(BenchTrainError, match=message):
            check_case(TrainCase(**{**ok.__dict__, **change}), 2, "cuda")
    with pytest.raises(BenchTrainError, match="--dtype fp32"):
        check_case(ok, 2, "cpu")
    # Megatron keeps fp32 main parameters itself: bf16 without ZeRO is fine there
    check_case(TrainCase(**{**ok.__dict__, "system": "megatron", "zero_stage": 0}), 2, "cuda")


def test_summary_takes_the_slowest_rank():
    from moe_ext.bench.train import TrainCase, summarize

    case = TrainCase(
        model="tiny", layers=2, system="deepspeed", strategy="ep_nccl", micro_batch=4,
        seq_len=100, peak_tflops=2.0,
    )  # fmt: skip
    ranks = [
        dict(seconds=[0.1, 0.2, 0.3], losses=[5.0, 4.0], peak_mem_gib=1.0, params=10, dp=2),
        dict(seconds=[0.4, 0.5, 0.9], losses=[5.1, 4.1], peak_mem_gib=2.0, params=12, dp=2),
    ]
    out = summarize(case, ranks, flops_per_token=1e9)
    assert out["step_ms"] == pytest.approx(500.0)  # rank 1's median
    assert out["step_p10_ms"] == pytest.approx(420.0) and out["step_p90_ms"] == pytest.approx(820)
    assert out["tokens_per_s"] == pytest.approx(2 * 4 * 100 / 0.5)
    assert out["mfu"] == pytest.approx(1600 * 1e9 / (2 * 2e12))
    assert out["peak_mem_gib"] == [1.0, 2.0] and out["params_per_rank"] == [10, 12]
    assert (out["first_loss"], out["last_loss"]) == (5.0, 4.0)


def test_rows_merge_table_and_chart(tmp_path):
    from moe_ext.bench.train import TrainRow, format_table, load_rows, merge_rows, plot

    def row(system, strategy, tok, status="ok"):
        return TrainRow(
            model="qwen3_30b_a3b", layers=4, system=system, strategy=strategy, world=2,
            link="p2p_off", dtype="bf16", micro_batch=8, seq_len=2048, zero_stage=1,
            grad_clip=1.0, status=status, tokens_per_s=tok, mfu=None if tok is None else 0.2,
            step_ms=None if tok is None else 1000.0, peak_mem_gib=[40.0, 41.5],
        )  # fmt: skip

    path = tmp_path / "rows.json"
    merge_rows(path, [row("deepspeed", "ep_nccl", 5e4), row("mcore_ag", "ep", 3e4)])
    rows = merge_rows(path, [row("deepspeed", "ep_nccl", 6e4), row("ds_moe", "ep", None, "e")])
    assert [(r.system, r.tokens_per_s) for r in load_rows(path)] == [
        ("mcore_ag", 3e4),
        ("deepspeed", 6e4),  # the same case again replaces the earlier row
        ("ds_moe", None),
    ]
    table = format_table(rows).splitlines()
    assert len(table) == 5 and "60,000" in table[3] and "20.0%" in table[3]
    assert "40.0/41.5" in table[3] and table[4].endswith(" e")
    from moe_ext.bench.train import mfu_text

    assert (mfu_text(0.3456), mfu_text(2.3e-6), mfu_text(None)) == ("34.6%", "0.00023%", "-")
    plot(rows, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_command_line_cases():
    tool = _tool()
    args = tool.parse_args(
        ["--model", "mixtral_8x7b", "--layers", "2", "--strategies", "replicate,ep_nccl"]
    )
    cases = tool.cases(args)
    assert [(c.system, c.strategy) for c in cases] == [
        ("deepspeed", "replicate"),
        ("deepspeed", "ep_nccl"),
        ("megatron", "replicate"),
        ("megatron", "ep_nccl"),
        ("mcore_a2a", "ep"),
        ("mcore_ag", "ep"),
        ("ds_moe", "ep"),
    ]
    first = cases[0]
    assert (first.micro_batch, first.seq_len, first.dtype, first.layers) == (8, 2048, "bf16", 2)
    with pytest.raises(SystemExit):
        tool.parse_args(["--systems", "deepspeed,nccl"])


# ---- engine=megatron in bf16 --------------------------------------------------------------


def test_megatron_bf16_settings():
    pytest.importorskip("megatron.core")
    from moe_ext.cli.train import train_dtype
    from moe_ext.launching import UsageError
    from moe_ext.megatron.engine import (
        MegatronEngineError,
        check_train_settings,
        megatron_optimizer_config,
    )

    for dtype, zero in (("bf16", 0), ("bf16", 1), ("fp32", 0), ("auto", 0), ("auto", 1)):
        check_train_settings(dtype, zero)
    with pytest.raises(MegatronEngineError, match=r"zero_stage=1 \(DistributedOptimizer\)"):
        check_train_settings("bf16", 2)
    with pytest.raises(MegatronEngineError, match="dtype=bf16"):
        check_train_settings("fp32", 1)
    with pytest.raises(MegatronEngineError, match="fp32 or bf16"):
        check_train_settings("fp16", 0)
    check_train_settings("bf16", 0, resume=True)
    with pytest.raises(MegatronEngineError, match="cannot resume with train.zero_stage=1"):
        check_train_settings("bf16", 1, resume=True)
    assert train_dtype("bf16", "cuda", 0, "megatron") == torch.bfloat16
    with pytest.raises(UsageError, match="zero_stage=1 or 2"):
        train_dtype("bf16", "cuda", 0, "deepspeed")
    conf = megatron_optimizer_config(
        dtype=torch.bfloat16,
        lr=1e-3,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        grad_clip=1.0,
        distributed_optimizer=True,
    )
    from moe_ext.megatron.engine import adam_config_class

    built = adam_config_class()(**conf)
    assert built.optimizer == "adam"
    assert built.bf16 and built.params_dtype == torch.bfloat16
    assert built.main_params_dtype == built.main_grads_dtype == torch.float32
    assert built.use_distributed_optimizer and built.clip_grad == 1.0
    assert (built.adam_beta1, built.adam_beta2, built.weight_decay) == (0.9, 0.95, 0.1)
    assert math.isclose(built.lr, 1e-3)


def test_isolated_case_commands(tmp_path):
    tool = _tool()
    argv = [
        "--nproc", "2", "--model", "tiny", "--systems=deepspeed,mcore_ag",
        "--strategies", "replicate,ep_nccl", "--json", str(tmp_path / "r.json"),
        "--png", str(tmp_path / "r.png"), "--case-timeout-s", "60",
    ]  # fmt: skip
    args = tool.parse_args(argv)
    commands = [tool.case_command(argv, c, args.nproc) for c in tool.cases(args)]
    tails = [cmd[cmd.index(str(TOOLS / "bench_train.py")) + 1 :] for cmd in commands]
    common = ["--model", "tiny", "--json", str(tmp_path / "r.json")]
    assert tails == [
        [*common, "--systems", "deepspeed", "--strategies", "replicate"],
        [*common, "--systems", "deepspeed", "--strategies", "ep_nccl"],
        [*common, "--systems", "mcore_ag", "--strategies", "replicate"],  # a peer ignores it
    ]
    assert all("--nproc-per-node=2" in cmd for cmd in commands)
    with pytest.raises(SystemExit):
        tool.parse_args(["--nproc", "2"])  # the cases need --json to report
