"""tools/bench_serve.py on CPU: the load generator against the real HTTP server over a fake
engine (tests/serve_fake.py, real socket on 127.0.0.1), its --compare-infer run of
launch/infer.py on the tiny model, and its --hf path on a tiny transformers model.

The fake engine's output is known for every prompt, so the texts, token counts, the
concurrency the server really saw and the sampling fields sent are checked against it;
percentiles against numpy; the transformers path against transformers' own greedy output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moe_ext.model.tokenizer import ByteTokenizer
from moe_ext.serve.engine import QueueFull
from moe_ext.serve.http import Defaults, HttpServer, build_app
from tests.serve_fake import FakeEngine, expected_ids
from tests.support import free_port, hf_greedy_each, hf_model

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import bench_serve  # noqa: E402

TOK = ByteTokenizer()


class PeakEngine(FakeEngine):
    """FakeEngine that records the most requests it ever had running at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.peak = 0

    def reset(self) -> None:
        super().reset()
        self.peak = 0

    def submit(self, prompt_ids, params):
        stream = super().submit(prompt_ids, params)
        with self._lock:
            self.peak = max(self.peak, len(self.running))
        return stream


@pytest.fixture(scope="module")
def served():
    engine = PeakEngine(model_name="tiny", max_context=256)
    app = build_app(engine, TOK, vocab_size=260, defaults=Defaults(temperature=1.0, top_p=1.0))
    port = free_port()
    server = HttpServer(app, "127.0.0.1", port)
    server.start(timeout_s=20.0)
    yield engine, f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def engine(served):
    served[0].reset()
    return served[0]


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [0.3, 5.0, 1.2, 9.9, 0.01, 4.4, 4.4]
    for q in (0, 1, 50, 90, 99, 100):
        assert bench_serve.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert bench_serve.percentile([], 50) is None


def test_prompt_mix():
    prompts = bench_serve.make_prompts(9, [4, 16, 64], vocab=50, seed=3)
    assert sorted(map(len, prompts)) == [4] * 3 + [16] * 3 + [64] * 3
    assert all(0 <= t < 50 for p in prompts for t in p)
    assert prompts == bench_serve.make_prompts(9, [4, 16, 64], vocab=50, seed=3)


def test_level_texts_concurrency_and_request_fields(served, engine):
    base = served[1]
    engine.delay_s = 0.004
    prompts = bench_serve.make_prompts(8, [5, 20], vocab=256, seed=0)
    results, wall_s = bench_serve.run_level(base, "tiny", prompts, 4, 10, timeout_s=20)
    assert engine.peak == 4  # four clients really kept four requests in flight
    for prompt, r in zip(prompts, results):
        assert r.error is None and r.finish_reason == "length"
        assert r.text == TOK.decode(expected_ids(len(prompt), 10))
        assert r.output_tokens == 10 and r.prompt_tokens == len(prompt)
        assert 0 < r.ttft_s <= r.chunk_s[-1] <= r.e2e_s <= wall_s
    sent = sorted(engine.submitted, key=lambda s: (len(s[0]), s[0]))
    assert sorted(ids for ids, _ in sent) == sorted(prompts)
    for _, params in sent:  # greedy, exactly max_tokens, despite the server's default of 1.0
        assert (params.max_tokens, params.temperature, params.ignore_eos) == (10, 0.0, True)

    row = bench_serve.summarize("serve", 4, results, wall_s)
    assert (row["requests"], row["errors"], row["output_tokens"]) == (8, 0, 80)
    assert row["output_tok_s"] == pytest.approx(80 / wall_s)
    # the fake waits delay_s before each token: every gap is at least that
    assert 4.0 <= row["itl_p50_ms"] <= row["itl_p99_ms"]
    assert row["ttft_p50_ms"] <= row["ttft_p99_ms"] <= row["e2e_p99_ms"]
    assert row["tpot_p50_ms"] >= 4.0


def test_sweep_json_png_and_report(served, engine, tmp_path, capsys):
    base = served[1]
    engine.delay_s = 0.001
    out_json, out_png = tmp_path / "serve.json", tmp_path / "serve.png"
    code = bench_serve.main(
        [
            f"--url={base}",
            "--concurrency=1,4",
            "--prompt-lens=3,12",
            "--max-tokens=6",
            "--requests=6",
            f"--json={out_json}",
            f"--png={out_png}",
        ]
    )
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["kind"], r["concurrency"]) for r in rows] == [("serve", 1), ("serve", 4)]
    for r in rows:
        assert (r["requests"], r["errors"], r["output_tokens"], r["model"]) == (6, 0, 36, "tiny")
        assert r["output_tok_s"] > 0 and r["ttft_p99_ms"] is not None
    assert engine.peak == 4
    assert len(engine.submitted) == 1 + 12  # the warm-up and two levels
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    out_png.unlink()
    assert bench_serve.main([f"--report={out_json}", f"--png={out_png}"]) == 0
    assert "serve" in capsys.readouterr().out and out_png.exists()


def test_refused_requests_are_counted_then_the_sweep_stops(served, engine):
    base = served[1]
    engine.refuse = QueueFull(2.0, max_queue=4)
    results, _ = bench_serve.run_level(base, "tiny", [[1, 2, 3]] * 3, 2, 4, timeout_s=20)
    assert all(r.error and r.error.startswith("HTTP 429") for r in results)
    row = bench_serve.summarize("serve", 2, results, 1.0)
    assert (
        row["errors"] == 3 and row["output_tokens"] == 0 and "queue is full" in row["first_error"]
    )
    with pytest.raises(bench_serve.BenchError, match="warm-up"):
        bench_serve.sweep(base, [1], [3], 4, 256, requests=2)


def test_engine_error_event_is_an_error(served, engine):
    engine.fail_after = 2
    results, _ = bench_serve.run_level(served[1], "tiny", [[7] * 5], 1, 6, timeout_s=20)
    assert results[0].error.startswith("error event")


def test_unreachable_server_is_one_line(capsys):
    code = bench_serve.main([f"--url=http://127.0.0.1:{free_port()}", "--concurrency=1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no model list") and "\n" not in err


def test_hf_one_at_a_time_equals_transformers_greedy(tmp_path):
    pytest.importorskip("transformers")
    hf = hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    # no id 0: hf_greedy_each passes no attention mask, so transformers would mask the pad id
    prompts = [[t or 1 for t in p] for p in bench_serve.make_prompts(3, [4, 9], vocab=64, seed=1)]
    (row,) = bench_serve.hf_rows(str(tmp_path / "hf"), prompts, 5, dtype="fp32")
    assert row["outputs"] == hf_greedy_each(hf, prompts, 5)
    assert (row["kind"], row["concurrency"], row["requests"], row["output_tokens"]) == (
        "hf",
        1,
        3,
        15,
    )
    assert 0 < row["ttft_p50_ms"] <= row["e2e_p50_ms"] and row["itl_p50_ms"] > 0


def test_compare_infer_runs_the_launcher_on_the_same_prompts():
    # launch/infer.py on the tiny model in batches of 2 (one process, ~6 s)
    prompts = bench_serve.make_prompts(3, [4, 7], vocab=256, seed=2)
    command = [sys.executable, str(REPO / "launch/infer.py")]
    row = bench_serve.infer_row(command, prompts, 2, 6)
    assert (row["kind"], row["concurrency"], row["requests"], row["output_tokens"]) == (
        "infer",
        2,
        3,
        18,
    )
    assert [len(o) for o in row["outputs"]] == [6, 6, 6]
    assert row["prompt_tokens_mean"] == pytest.approx(sum(map(len, prompts)) / 3)
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["output_tok_s"] > 0
    with pytest.raises(bench_serve.BenchError, match="exited 2"):
        bench_serve.infer_row(command + ["strategy=nonsense"], prompts, 2, 6)


def test_infer_json_rows_apply_bench_infer_rates_to_each_level(tmp_path, capsys):
    """--infer-json: bench_infer's row at batch C gives each serve level an infer row whose
    tok/s is the level's tokens over prompt / prefill rate + (generated - requests) / decode
    rate; several plans at one batch need --infer-strategy (auto: auto's picks)."""
    level = dict(kind="serve", errors=0, output_tok_s=1.0)
    serve = [
        dict(level, concurrency=1, requests=2, output_tokens=20, prompt_tokens_mean=50.0),
        dict(level, concurrency=4, requests=8, output_tokens=80, prompt_tokens_mean=30.0),
    ]
    bench = [
        dict(
            strategy="tp_experts", auto_pick=True, batch=1, prefill_tok_s=1000.0, decode_tok_s=9.0
        ),
        dict(
            strategy="tp_experts", auto_pick=False, batch=1, prefill_tok_s=2000.0, decode_tok_s=10.0
        ),
        dict(strategy="replicate", auto_pick=False, batch=1, prefill_tok_s=500.0, decode_tok_s=5.0),
    ]
    path = tmp_path / "infer.json"
    path.write_text(json.dumps({"rows": bench}))
    with pytest.raises(bench_serve.BenchError, match="3 rows at batch 1.*--infer-strategy"):
        bench_serve.infer_rows_from_bench(str(path), serve)
    (row,) = bench_serve.infer_rows_from_bench(str(path), serve, "tp_experts")  # no batch 4
    assert (row["kind"], row["concurrency"], row["requests"]) == ("infer", 1, 2)
    assert row["output_tok_s"] == pytest.approx(20 / (100 / 2000 + 18 / 10))
    (auto,) = bench_serve.infer_rows_from_bench(str(path), serve, "auto")
    assert auto["output_tok_s"] == pytest.approx(20 / (100 / 1000 + 18 / 9))
    report = tmp_path / "serve.json"
    report.write_text(json.dumps({"rows": serve}))
    args = [f"--report={report}", f"--infer-json={path}", "--infer-strategy=replicate"]
    assert bench_serve.main(args) == 0
    assert "infer" in capsys.readouterr().out
    assert bench_serve.main([f"--report={report}", f"--infer-json={tmp_path}/none.json"]) == 2
    assert "not a tools/bench_infer.py JSON" in capsys.readouterr().err
