"""bench_train_step's code path on the CPU: the tiny preset, both variants in their subprocesses, 1+1 steps; and a
variant that fails is recorded in the CSV instead of stopping the benchmark. No timing assertions."""
import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train_step.py"


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # the CPU path even where CUDA exists
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=170)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_quick_tiny_both_variants(tmp_path):
    r = _run(tmp_path, "--presets", "tiny")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _rows(tmp_path / "bench_train_step.csv")
    assert [(x["preset"], x["variant"], x["status"]) for x in rows] == [("tiny", "naive", "ok"), ("tiny", "ours", "ok")]
    naive, ours = rows
    assert (naive["caption_gather"], naive["gather_decided"], naive["loss_backend_resolved"]) == \
        ("per_layer", "per_layer", "torch")
    assert (ours["caption_gather"], ours["gather_decided"]) == ("auto", "once")
    for row in rows:
        step = float(row["step_s"])
        parts = sum(float(row[k]) for k in ("caption_s", "ground_fwd_s", "loss_fwd_s", "backward_s", "optimizer_s",
                                            "data_s", "other_s"))
        assert step > 0 and float(row["caption_s"]) > 0 and float(row["backward_s"]) > 0
        assert math.isclose(parts, step, rel_tol=0.05, abs_tol=5e-3), (parts, step)  # the breakdown adds up
        assert math.isclose(float(row["samples_per_s"]), 2 / step, rel_tol=1e-3)  # micro-batch 2 per step
        assert float(row["peak_memory_mb"]) > 0 and float(row["loss_fwd_bwd_ms"]) > 0
        assert math.isfinite(float(row["loss_last"]))
    summary = _rows(tmp_path / "bench_train_step_summary.csv")
    assert len(summary) == 1 and summary[0]["caption_result"] in ("PASS", "MISS")
    assert (tmp_path / "bench_train_step.png").stat().st_size > 0
    assert "| tiny | ours |" in (tmp_path / "bench_train_step.md").read_text()


def test_quick_tiled_run_records_its_tiles(tmp_path):
    # 192 px images on the tiny model's 64 px tile: 2x2 tiles + the thumbnail
    r = _run(tmp_path, "--presets", "tiny", "--variants", "ours", "--max-tiles", "4", "--image-size", "192")
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = _rows(tmp_path / "bench_train_step.csv")
    assert (row["status"], row["max_tiles"], row["image_size"]) == ("ok", "4", "192")
    assert float(row["step_s"]) > 0 and math.isfinite(float(row["loss_last"]))


def test_failed_variant_is_recorded(tmp_path):
    r = _run(tmp_path, "--presets", "no-such-preset", "--variants", "ours")
    assert r.returncode == 1
    (row,) = _rows(tmp_path / "bench_train_step.csv")
    assert row["status"] == "failed" and "no-such-preset" in row["error"], row
    assert (tmp_path / "bench_train_step_no-such-preset_ours.log").is_file()
    (summary,) = _rows(tmp_path / "bench_train_step_summary.csv")
    assert summary["caption_result"].startswith("n/a")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_ratios_and_verdicts():
    bench = _load_bench()
    row = lambda v, cap, sps: {"preset": "p", "variant": v, "status": "ok", "caption_s": cap,  # noqa: E731
                               "samples_per_s": sps, "step_s": 4 / sps, "peak_memory_mb": 100.0,
                               "loss_fwd_bwd_ms": 2.0}
    (s,) = bench.summarize([row("naive", 1.0, 1.0), row("ours", 0.1, 2.5)], "gpu")
    assert math.isclose(s["caption_speedup"], 10.0) and s["caption_result"] == "PASS"
    assert math.isclose(s["samples_per_s_speedup"], 2.5) and s["step_result"] == "PASS"
    (s,) = bench.summarize([row("naive", 1.0, 1.0), row("ours", 0.5, 1.5)], "gpu")
    assert s["caption_result"] == "MISS" and s["step_result"] == "MISS"
    # the optional variants alone (e.g. --variants ours_cudnn ours) give no verdict, and say why
    (s,) = bench.summarize([row("ours_cudnn", 0.2, 2.0), row("ours", 0.1, 2.5)], "gpu")
    assert s["caption_result"] == s["step_result"] == "n/a (naive or ours not run)"


def test_optional_variants_change_one_switch_each():
    bench = _load_bench()
    for name in ("naive", "ours"):
        with_cudnn = dict(bench.VARIANTS[f"{name}_cudnn"])
        assert with_cudnn.pop("cudnn_attention") is True and with_cudnn == bench.VARIANTS[name]
    whole = dict(bench.VARIANTS["ours_whole_step"])
    assert whole.pop("zero3_whole_step") is True and whole == bench.VARIANTS["ours"]


def test_memory_estimates_script_writes_the_readme_table(tmp_path):
    """benchmarks/memory_estimates.py builds both shapes on the meta device and writes the table README quotes."""
    out = tmp_path / "mem.md"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_estimates.py"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_text() == (ROOT / "benchmarks" / "results" / "memory_estimates.md").read_text()


def _variant_whose_worker_hangs(bench, tmp_path, monkeypatch, result: dict) -> dict:
    """run_variant (4 measured steps, 3 s limit) with a worker that writes `result` to its result file and hangs."""
    import argparse

    real_popen = subprocess.Popen

    def worker_that_hangs(cmd, **kw):
        path = cmd[cmd.index("--result") + 1]
        script = f"import json, time; open({path!r}, 'w').write(json.dumps({result!r})); time.sleep(60)"
        return real_popen([sys.executable, "-c", script], **kw)

    monkeypatch.setattr(bench.subprocess, "Popen", worker_that_hangs)
    args = argparse.Namespace(steps=4, warmup=1, micro_batch=2, num_workers=0, max_new_tokens=4, precision="auto",
                              max_tiles=1, profile=False, out=str(tmp_path))
    return bench.run_variant(args, "tiny", result["variant"], tmp_path / "data.yaml", tmp_path, dict(os.environ),
                             timeout_s=3)


def test_a_variant_killed_after_some_steps_keeps_them(tmp_path, monkeypatch):
    """Device time is short: a worker killed by the per-variant timeout after writing its running result is
    reported with the steps it measured (status partial, the verdicts marked), not lost."""
    bench = _load_bench()
    partial = {"preset": "tiny", "variant": "ours", "steps": 2, "step_s": 0.5, "caption_s": 0.1,
               "samples_per_s": 8.0, "peak_memory_mb": 100.0, "complete": False}
    row = _variant_whose_worker_hangs(bench, tmp_path, monkeypatch, partial)
    assert row["status"] == "partial" and row["step_s"] == 0.5
    assert "timed out after 3 s" in row["error"] and "2 of 4 measured steps" in row["error"]
    naive = dict(partial, variant="naive", status="ok", caption_s=1.0, samples_per_s=2.0)
    (s,) = bench.summarize([naive, row], "gpu")
    assert s["caption_result"] == "PASS (partial)" and s["step_result"] == "PASS (partial)"


def test_a_worker_killed_after_its_complete_result_is_ok(tmp_path, monkeypatch):
    """A worker that wrote its complete result and then hangs at exit (teardown) keeps status ok, with a note."""
    done = {"preset": "tiny", "variant": "naive", "steps": 4, "step_s": 1.0, "caption_s": 0.5,
            "samples_per_s": 4.0, "peak_memory_mb": 100.0, "loss_fwd_bwd_ms": 3.0, "complete": True}
    row = _variant_whose_worker_hangs(_load_bench(), tmp_path, monkeypatch, done)
    assert row["status"] == "ok" and row["loss_fwd_bwd_ms"] == 3.0
    assert "after writing its complete result" in row["error"]


def test_vision_tower_benchmark_batches_the_windows_with_the_same_output(tmp_path):
    """bench_vision_tower on the CPU, narrow and shallow: the chunks of the 3B tower at 644 px (its budget's least)."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vision_tower.py"), "--out", str(tmp_path),
                          "--hidden", "32", "--heads", "2", "--depth", "8", "--size", "644", "--images", "2",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "bench_vision_tower.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    # 644 px: 23 x 23 merged tokens, 6 x 6 windows per image (4 x 4 merged tokens, the last row and column 3 wide);
    # 7 window layers and 1 full one (index 7)
    per_chunk, batched = rows["per_chunk"], rows["batched"]
    assert per_chunk["windows"] == "72" and int(per_chunk["sdpa_calls"]) == 7 * 72 + 1 * 2
    assert int(batched["sdpa_calls"]) == 7 * 3 + 1  # window lengths 64, 48 and 36 patches; two equal images
    assert float(batched["max_abs_diff"]) == 0.0
