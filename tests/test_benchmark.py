"""benchmark.py: the FLOP model, the ladder's flags, a smoke run of real rows and a failing row."""

import json
import math

import pytest

import benchmark

SMOKE_CONFIGS = ["reference", "opt+attention", "diffusers-eager"]  # the all-off rung: test_optimized, in process


def test_flop_per_step_at_1024_and_512_text_tokens():
    linear, attention = benchmark.flop_per_step(1024, 1024, 512)
    assert linear == pytest.approx(5.95e13, rel=0.01)
    assert attention == pytest.approx(1.49e13, rel=0.01)
    assert benchmark.flop_per_step(1024, 1024, 512, batch=2) == (2 * linear, 2 * attention)


def test_ladder_adds_one_optimization_per_rung():
    """Parsed by the optimized script itself: the bottom rung has every optimization off but bf16 RoPE (and those
    that only shape compile or fp8), each rung switches more on, and the top rung is the whole script."""
    import optimized_inference as oi

    def options(row):
        args = oi.build_parser().parse_args(["--prompt", "x", *benchmark.ROWS[row].flags])
        return {f.name for f in oi.OPTIMIZATIONS if getattr(args, f.name) not in (False, "sdpa")}

    assert options("opt-bf16") == {"bf16_rope", "regional_compile", "dynamic_shapes", "fp8_fused_quant"}
    rungs = [name for name in benchmark.ROWS if name == "opt-bf16" or name.startswith("opt+")]
    for lower, upper in zip(rungs, rungs[1:]):
        assert options(lower) < options(upper), (lower, upper)
    assert options(rungs[-1]) == {f.name for f in oi.OPTIMIZATIONS} - {"text_buckets"}
    assert benchmark.ROWS["opt+attention"].flags == ("--no-text-buckets",)
    assert benchmark.ROWS["opt-text256"] == benchmark.Row("optimized_inference.py", ("--no-text-buckets",), 256)


def test_without_a_model_the_weights_are_random_and_every_report_says_so():
    args = benchmark.parse_args([])
    assert args.random_weights and args.model == benchmark.DEFAULT_MODEL
    assert args.configs == list(benchmark.ROWS)
    assert "random weights" in benchmark.report_title(args, "NVIDIA H100 80GB HBM3")


def test_smoke_run_reports_every_row_and_a_failing_one(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    """Every row runs in its own process and is reported; a row whose process fails at once (the optimized script
    rejects a flag it does not know) is a failed row, and the rows after it still run."""
    monkeypatch.setitem(benchmark.ROWS, "broken", benchmark.Row("optimized_inference.py", ("--no-such-flag",)))
    configs = ["broken", *SMOKE_CONFIGS]
    status = benchmark.main(["--smoke", "--model", tiny_pipeline_dir, "--configs", ",".join(configs),
                             "--out-dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert status == 1 and "FAILED" in stdout
    for i, name in enumerate(configs, 1):
        assert f"[{i}/{len(configs)}] {name}" in stdout  # a progress line per row

    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["config"] for row in results["rows"]] == configs
    assert results["roofline"] is None  # --smoke runs on the CPU: nothing to measure a roofline on
    assert all(results["environment"][key] for key in ("torch", "diffusers", "transformers", "date", "command"))
    broken, *rows = results["rows"]
    assert broken["status"] == "failed"
    assert broken["error"].endswith("unrecognized arguments: --no-such-flag")
    assert broken["denoiser"] is None and broken["images_per_hour"] is None
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None, row
        for stage in benchmark.STAGES:
            stats = row[stage]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"] < math.inf
        assert len(row["runs"]) == 2
        for key in ("warmup_s", "achieved_tflops", "images_per_hour", "cost_per_1000_images"):
            assert math.isfinite(row[key]) and row[key] >= 0, key
        # GPU-only numbers stay empty on the CPU.
        assert row["peak_mem_GiB"] is None and row["roofline_pct"] is None
        assert (tmp_path / f"{row['config']}.log").stat().st_size > 0

    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in SMOKE_CONFIGS) and "| broken | failed: " in table
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
