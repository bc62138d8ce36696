"""Training-step benchmark: naive ZeRO-3 dual-loop step vs ours, same run, same GPU.

For each model preset (default `small` and `sa2va-1b-shape`; ZeRO-3 `zero3_bf16`, bf16, activation checkpointing,
one GPU, synthetic SA-1B + RefCOCO data at 1024 px with native-resolution masks) two variants are trained for a few
steps, each in its own subprocess (a clean GPU, and one crash or hang does not take the others down). Any random
preset can be named with --presets, e.g. the Qwen Sa2VA shapes `sa2va-qwen2_5-3b-shape` (Qwen2.5-VL-3B + SAM2-L,
1369 image tokens per 1024² image at the default pixel budget) and `sa2va-qwen3-4b-shape` (Qwen3-VL-4B + SAM2-L,
1024 tokens), which are not in the default list (`make gpu-check`'s `qwen` part runs them):

    naive  loop.caption.gather=per_layer (ZeRO-3 hooks fetch every layer for every generated token)
           loop.caption.cuda_graph=false (a graph cannot hold weights that are fetched per layer anyway)
           loop.loss.backend=torch       (eager per-mask upsample + loss)
    ours   loop.caption.gather=auto      (weights gathered once for the caption phase, hooks removed)
           loop.caption.cuda_graph=true  (static KV cache; each token after the second one CUDA graph replay)
           loop.loss.backend=auto        (fused Triton kernel)
    ours_eager_decode (only with --variants): ours with loop.caption.cuda_graph=false (the graph's own share)
    naive_cudnn, ours_cudnn (only with --variants): with model.cudnn_attention=true, torch's cuDNN attention as
           before stop 13 (per new sequence length it builds a graph; see benchmarks/bench_sdpa_shapes.py)
    ours_whole_step (only with --variants): ours with train.zero3_whole_step=true (the whole model gathered once
           per optimizer step, forward and backward without ZeRO-3's module hooks)
    ours_zero2 (only with --variants): ours under ZeRO-2 (zero2_bf16; weights whole on the GPU, nothing gathered)

Warmup steps are excluded; medians of the measured steps are reported: step time and its breakdown (caption phase,
grounding forward, mask-loss forward, backward, optimizer, data), samples/s, peak GPU memory, and the ratios
ours/naive against the targets (caption phase >= 5x faster, samples/s >= 2x), printed PASS/MISS as measured.
The mask loss's backward runs inside `backward`; `loss_fwd_bwd_ms` times it in isolation on the last step's logits.

Writes bench_train_step.csv (one row per preset x variant, failures with their error), bench_train_step_summary.csv
(ratios per preset), bench_train_step.md and bench_train_step.png under --out, all naming the GPU.

    python benchmarks/bench_train_step.py --out benchmarks/results           # GPU, ~5 minutes on one H100
    python benchmarks/bench_train_step.py --quick --presets tiny --out /tmp/b  # CPU smoke run of the code path
    python benchmarks/bench_train_step.py --presets sa2va-qwen2_5-3b-shape sa2va-qwen3-4b-shape --out DIR  # GPU
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "naive": {"gather": "per_layer", "cuda_graph": False, "loss_backend": "torch"},
    "ours": {"gather": "auto", "cuda_graph": True, "loss_backend": "auto"},
    # not run by default: ours without the CUDA-graph decoding, to see what the graph alone brings
    "ours_eager_decode": {"gather": "auto", "cuda_graph": False, "loss_backend": "auto"},
    # not run by default: both with torch's cuDNN attention back on (model.cudnn_attention; stop 13 measured them
    # so), to compare with the default in one run
    "naive_cudnn": {"gather": "per_layer", "cuda_graph": False, "loss_backend": "torch", "cudnn_attention": True},
    "ours_cudnn": {"gather": "auto", "cuda_graph": True, "loss_backend": "auto", "cudnn_attention": True},
    # not run by default: ours with train.zero3_whole_step (the whole model gathered once per step, no module hooks)
    "ours_whole_step": {"gather": "auto", "cuda_graph": True, "loss_backend": "auto", "zero3_whole_step": True},
    # not run by default: ours under ZeRO-2 (zero2_bf16: weights whole on every GPU, no gathering at all), the
    # faster choice for models whose 16-bit weights fit on each GPU
    "ours_zero2": {"gather": "auto", "cuda_graph": True, "loss_backend": "auto", "ds_config": "zero2_bf16"},
}
DEFAULT_VARIANTS = ("naive", "ours")
DEFAULT_PRESETS = ("small", "sa2va-1b-shape")
TARGET_CAPTION_SPEEDUP = 5.0  # caption phase time, naive / ours
TARGET_STEP_SPEEDUP = 2.0  # samples/s, ours / naive

FIELDS = ["gpu", "preset", "variant", "caption_gather", "gather_decided", "gathered_mb", "decoding", "loss_backend",
          "loss_backend_resolved", "micro_batch", "warmup", "steps", "image_size", "max_tiles", "max_new_tokens",
          "step_s", "caption_s", "ground_fwd_s",
          "loss_fwd_s", "backward_s", "optimizer_s", "data_s", "other_s", "samples_per_s", "peak_memory_mb",
          "loss_fwd_bwd_ms", "skipped_steps", "loss_last", "build_s", "wall_s", "status", "error"]
SUMMARY_FIELDS = ["gpu", "preset", "caption_speedup", "caption_result", "samples_per_s_speedup", "step_result",
                  "step_time_ratio", "peak_memory_ratio", "loss_fwd_bwd_speedup"]
BREAKDOWN = ["caption_s", "ground_fwd_s", "loss_fwd_s", "backward_s", "optimizer_s", "data_s", "other_s"]


# ---------------------------------------------------------------------------------------------------- environment
def _cuda_available() -> bool:
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def worker_env(cuda: bool) -> dict:
    """Environment of a worker: CPU accelerator without CUDA; an arch list DeepSpeed's op builder accepts."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
        return env
    arch = env.get("TORCH_CUDA_ARCH_LIST")
    if not arch:  # FusedAdam's JIT build (~40 s once) for this GPU only
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}.{minor}"
    env["TORCH_CUDA_ARCH_LIST"] = arch.replace("a", "")  # DeepSpeed's builder rejects entries like 9.0a
    return env


# ---------------------------------------------------------------------------------------------------- data
def write_bench_corpus(root: Path, image_size: int, n_images: int, seed: int = 0) -> Path:
    """SA-1B + RefCOCO layouts (JPEG images, RLE / polygon masks at the image's resolution); returns a data YAML.

    The video layouts are left out: at 1024 px their encoding dominates the writing time and adds nothing here."""
    import numpy as np
    import yaml

    from dualloop.data.synthetic import write_refcoco, write_sa1b

    write_sa1b(root / "sa1b", np.random.default_rng([seed, 4]), n_images, image_size, start_id=1)
    write_refcoco(root / "refcoco", np.random.default_rng([seed, 8]), n_images, image_size)
    data = {"seed": seed, "datasets": [
        {"name": "sa1b", "kind": "sa1b", "root": str(root / "sa1b"), "repeats": 1},
        {"name": "refcoco", "kind": "refcoco", "root": str(root / "refcoco"), "repeats": 1, "split": "train",
         "image_root": str(root / "refcoco" / "images")},
    ]}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({"data": data}, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------- worker
class _TimedStep:
    """Wraps the trainer's DualLoopStep: wall time of the whole forward (caption + grounding + losses), synced."""

    def __init__(self, inner, sync):
        self.inner, self.sync, self.last_s = inner, sync, 0.0

    def __call__(self, batch, generator=None):
        t0 = time.perf_counter()
        out = self.inner(batch, generator)
        self.sync()
        self.last_s = time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def worker_config(args, data_yaml: Path, out_dir: Path, cuda: bool):
    import yaml

    from dualloop.config import load_config

    base = yaml.safe_load(data_yaml.read_text())
    base["data"]["num_workers"] = args.num_workers
    variant = VARIANTS[args.variant]
    precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    caption = {"gather": variant["gather"], "cuda_graph": variant["cuda_graph"]}
    if args.max_new_tokens:
        caption["max_new_tokens"] = args.max_new_tokens
    base.update(
        model={"preset": args.preset, "cudnn_attention": variant.get("cudnn_attention", False),
               "max_tiles": args.max_tiles},
        loop={"caption_grad": "none", "caption": caption, "loss": {"backend": variant["loss_backend"]}},
        train={"output_dir": str(out_dir), "steps": args.warmup + args.steps, "micro_batch_size": args.micro_batch,
               "grad_accum": 1, "ds_config": variant.get("ds_config", "zero3_bf16"), "precision": precision,
               "activation_checkpointing": True, "resume": "none", "save_every": 10**9, "tensorboard": False,
               "progress_bar": False, "log_every": 10**9, "warmup_ratio": 0.0,
               "zero3_whole_step": variant.get("zero3_whole_step", False)},
    )
    return load_config(None, [], base=base)


def run_worker(args) -> dict:
    """Train `args.preset` x `args.variant` for warmup + steps steps in this process; returns the result row."""
    cuda = _cuda_available()
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
    t_build = time.perf_counter()
    import torch

    import dualloop.loop.step as step_module
    from dualloop.train.generation import decide_gather, gathered_bytes, lora_merge_bytes
    from dualloop.train.trainer import Trainer

    def sync():
        if cuda:
            torch.cuda.synchronize()

    cfg = worker_config(args, Path(args.data_config), Path(args.run_dir), cuda)
    trainer = Trainer(cfg)
    build_s = time.perf_counter() - t_build

    # what "auto" resolves to on this machine (world size 1: decide_gather makes no collective call)
    params = list({id(p): p for m in trainer.model.vision_language_modules() for p in m.parameters()}.values())
    gather_decided = ("once" if decide_gather(cfg.loop.caption.gather, params, trainer.device,
                                              extra_bytes=lora_merge_bytes(trainer.model.vision_language_modules()))
                      else "per_layer") \
        if trainer.zero3 else "n/a (not ZeRO-3)"
    try:
        from dualloop.kernels import _resolve_backend

        backend_resolved = _resolve_backend(cfg.loop.loss.backend, trainer.device)
    except Exception as e:  # noqa: BLE001 - informational only
        backend_resolved = f"? ({type(e).__name__})"

    # the mask-loss forward, timed with syncs on both sides; the last call's inputs kept for the isolated timing
    loss_calls: list[float] = []
    last_inputs: dict = {}
    mask_losses = step_module.mask_losses

    def timed_mask_losses(logits, targets, spec, *rest, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = mask_losses(logits, targets, spec, *rest, **kwargs)
        sync()
        loss_calls.append(time.perf_counter() - t0)
        last_inputs.update(logits=logits.detach(), targets=targets, spec=spec)
        return out

    step_module.mask_losses = timed_mask_losses
    timed_step = _TimedStep(trainer.step_fn, sync)
    trainer.step_fn = timed_step

    def result(records: list[dict], loss_ms: float) -> dict:
        measured = records[args.warmup:]
        med = lambda key: statistics.median(r[key] for r in measured)  # noqa: E731
        return {
            "preset": args.preset, "variant": args.variant, "caption_gather": cfg.loop.caption.gather,
            "gather_decided": gather_decided, "gathered_mb": round(gathered_bytes(params) / 2**20, 1),
            "decoding": trainer.model.last_decoding,  # dynamic | static | graph (the last caption phase's)
            "loss_backend": cfg.loop.loss.backend, "loss_backend_resolved": backend_resolved,
            "micro_batch": args.micro_batch, "warmup": args.warmup, "steps": len(measured),
            "max_new_tokens": cfg.loop.caption.max_new_tokens, "max_tiles": cfg.model.max_tiles,
            "step_s": med("step_time_s"), "caption_s": med("time_caption_s"), "ground_fwd_s": med("ground_fwd_s"),
            "loss_fwd_s": med("loss_fwd_s"), "backward_s": med("time_backward_s"),
            "optimizer_s": med("time_optimizer_s"), "data_s": med("time_data_s"), "other_s": med("other_s"),
            "samples_per_s": med("samples_per_s"), "peak_memory_mb": max(r["peak_memory_mb"] for r in measured),
            "loss_fwd_bwd_ms": loss_ms, "skipped_steps": sum(bool(r["skipped"]) for r in records),
            "loss_last": measured[-1].get("loss"), "build_s": build_s,
            "per_step_s": [r["step_time_s"] for r in records],
        }

    records = []
    for step in range(args.warmup + args.steps):
        loss_calls.clear()
        rec = trainer.train_step(step)
        caption = rec["time_caption_s"]
        loss_fwd = sum(loss_calls)
        rec["loss_fwd_s"] = loss_fwd
        rec["ground_fwd_s"] = max(timed_step.last_s - caption - loss_fwd, 0.0)
        accounted = rec["time_data_s"] + timed_step.last_s + rec["time_backward_s"] + rec["time_optimizer_s"]
        rec["other_s"] = max(rec["step_time_s"] - accounted, 0.0)
        records.append(rec)
        print(f"[bench_train_step] {args.preset}/{args.variant} step {step + 1}/{args.warmup + args.steps}: "
              f"{rec['step_time_s']:.3f} s (caption {caption:.3f} s)", file=sys.stderr, flush=True)
        if len(records) > args.warmup:  # a timeout (device time is short) keeps the steps measured so far
            Path(args.result).write_text(json.dumps(dict(result(records, float("nan")), complete=False)))
    step_module.mask_losses = mask_losses
    loss_ms = float("nan")
    if last_inputs:  # the loss alone, forward + backward, on the last step's logits (median of 5)
        times = []
        for i in range(6):
            logits = last_inputs["logits"].clone().requires_grad_(True)
            sync()
            t0 = time.perf_counter()
            mask_losses(logits, last_inputs["targets"], last_inputs["spec"]).total.mean().backward()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        loss_ms = 1000 * statistics.median(times)

    if args.profile_out:  # one more step, not measured: where its host time goes (waits on the GPU included)
        profile_step(trainer, args.warmup + args.steps, Path(args.profile_out),
                     f"{args.preset}/{args.variant}, step {args.warmup + args.steps + 1} (after the measured ones)")

    return dict(result(records, loss_ms), complete=True)


def profile_step(trainer, step: int, path: Path, title: str) -> None:
    """cProfile of one training step: the functions with the most cumulative and own time, written to `path`."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    trainer.train_step(step)
    prof.disable()
    prof.dump_stats(str(path.with_suffix(".prof")))  # for callers/callees: python -m pstats FILE
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    # the caption phase's parts (gather, hooks, LoRA merge, decoding) and ZeRO-3's gather/release, however deep
    stats.sort_stats("cumulative").print_stats("generation.py|kv_decoding.py|composite.py|partition_parameters.py|"
                                               "partitioned_param_coordinator.py", 40)
    path.write_text(f"# cProfile of one training step: {title}\n{buf.getvalue()}")


def worker_main(args) -> int:
    result = run_worker(args)
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------- parent
def run_variant(args, preset: str, variant: str, data_yaml: Path, tmp: Path, env: dict, timeout_s: float) -> dict:
    """One preset x variant in a subprocess; always returns a row (status ok or the error)."""
    result_file = tmp / f"{preset}_{variant}.json"
    log_file = tmp / f"{preset}_{variant}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--preset", preset, "--variant", variant,
           "--data-config", str(data_yaml), "--run-dir", str(tmp / f"run_{preset}_{variant}"),
           "--result", str(result_file), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--micro-batch", str(args.micro_batch), "--num-workers", str(args.num_workers),
           "--max-new-tokens", str(args.max_new_tokens), "--precision", args.precision,
           "--max-tiles", str(args.max_tiles)]
    if args.profile and variant != "naive":  # the naive profile costs a long step and says little new
        cmd += ["--profile-out", str(Path(args.out) / f"bench_train_step_profile_{preset}_{variant}.txt")]
    row = {"preset": preset, "variant": variant, "caption_gather": VARIANTS[variant]["gather"],
           "loss_backend": VARIANTS[variant]["loss_backend"]}
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        # own session: on timeout the worker and its data-loader processes go down together
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    row["wall_s"] = time.perf_counter() - t0
    tail = log_file.read_text(errors="replace").splitlines()[-40:]
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if rc is None:
        error = f"timed out after {timeout_s:.0f} s"
    elif rc != 0:
        last = next((ln for ln in reversed(tail) if ln.strip() and not ln.startswith(" ")), f"exit code {rc}")
        error = f"exit code {rc}: {last.strip()}"[:300]
    if result and result.get("complete"):  # every figure measured; a slow or failed exit is only noted
        row.update(result, status="ok", error="" if rc == 0 else f"{error}, after writing its complete result")
        return row
    if result:  # the steps measured before the timeout or crash: reported, marked partial
        row.update(result, status="partial",
                   error=f"{error}; medians of the {result['steps']} of {args.steps} measured steps done")
    else:
        row.update(status="failed", error=error)
    kept = Path(args.out) / f"bench_train_step_{preset}_{variant}.log"
    kept.write_text(log_file.read_text(errors="replace"))
    print(f"[bench_train_step] {preset}/{variant} FAILED ({error}); log: {kept}\n" + "\n".join(tail),
          file=sys.stderr, flush=True)
    return row


def _ok(row: dict | None) -> bool:
    """Has figures: complete, or partial (some measured steps before a timeout or crash)."""
    return bool(row) and row.get("status") in ("ok", "partial")


def _ratio(a, b) -> float:
    try:
        return float(a) / float(b) if float(b) > 0 else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def summarize(rows: list[dict], gpu: str) -> list[dict]:
    out = []
    by = {(r["preset"], r["variant"]): r for r in rows}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        naive, ours = by.get((preset, "naive")), by.get((preset, "ours"))
        s = {"gpu": gpu, "preset": preset}
        if not (_ok(naive) and _ok(ours)):
            why = "n/a (a variant failed)" if naive is not None and ours is not None else "n/a (naive or ours not run)"
            s.update(caption_result=why, step_result=why)
            out.append(s)
            continue
        cap = _ratio(naive["caption_s"], ours["caption_s"])
        sps = _ratio(ours["samples_per_s"], naive["samples_per_s"])
        partial = " (partial)" if "partial" in (naive["status"], ours["status"]) else ""
        s.update(caption_speedup=cap, samples_per_s_speedup=sps,
                 caption_result=("PASS" if cap >= TARGET_CAPTION_SPEEDUP else "MISS") + partial,
                 step_result=("PASS" if sps >= TARGET_STEP_SPEEDUP else "MISS") + partial,
                 step_time_ratio=_ratio(ours["step_s"], naive["step_s"]),
                 peak_memory_ratio=_ratio(ours["peak_memory_mb"], naive["peak_memory_mb"]),
                 loss_fwd_bwd_speedup=_ratio(naive.get("loss_fwd_bwd_ms"), ours.get("loss_fwd_bwd_ms")))
        out.append(s)
    return out


def _fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return "" if v is None else str(v)


def markdown(rows: list[dict], summary: list[dict], gpu: str, args) -> str:
    precision = args.precision if args.precision != "auto" else ("bf16" if args.cuda else "fp32")
    lines = [f"### Training step: naive vs ours ({gpu})", "",
             f"ZeRO-3 (zero3_bf16; ours_zero2: zero2_bf16), {precision}, activation checkpointing, 1 process, "
             f"micro-batch {args.micro_batch}, images {args.image_size} px, medians of {args.steps} steps after "
             f"{args.warmup} warmup. Times in seconds per step.", "",
             "| preset | variant | step | caption | ground fwd | loss fwd | backward | optimizer | data | "
             "samples/s | peak MB | loss fwd+bwd ms | decoding | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vals = [r.get(k) for k in ("step_s", "caption_s", "ground_fwd_s", "loss_fwd_s", "backward_s",
                                   "optimizer_s", "data_s")]
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        lines.append(f"| {r['preset']} | {r['variant']} | " + " | ".join(_fmt(v) for v in vals)
                     + f" | {_fmt(r.get('samples_per_s'), 2)} | {_fmt(r.get('peak_memory_mb'), 0)} | "
                     f"{_fmt(r.get('loss_fwd_bwd_ms'), 2)} | {r.get('decoding') or '-'} | {status} |")
    lines += ["", f"| preset | caption phase naive/ours (target ≥ {TARGET_CAPTION_SPEEDUP:g}×) | samples/s ours/naive "
              f"(target ≥ {TARGET_STEP_SPEEDUP:g}×) | peak memory ours/naive | loss fwd+bwd naive/ours |",
              "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['preset']} | {_fmt(s.get('caption_speedup'), 2)}× {s['caption_result']} | "
                     f"{_fmt(s.get('samples_per_s_speedup'), 2)}× {s['step_result']} | "
                     f"{_fmt(s.get('peak_memory_ratio'), 2)} | {_fmt(s.get('loss_fwd_bwd_speedup'), 2)}× |")
    if not args.cuda:
        lines += ["", "CPU smoke run: the code path only; the targets are for the GPU."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], summary: list[dict], path: Path, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if _ok(r)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 2.0 + 0.7 * max(len(rows), 2)))
    labels = [f"{r['preset']} / {r['variant']}" for r in ok]
    left = [0.0] * len(ok)
    colours = plt.get_cmap("tab10").colors
    for i, key in enumerate(BREAKDOWN):
        vals = [float(r.get(key) or 0.0) for r in ok]
        axes[0].barh(labels, vals, left=left, color=colours[i], label=key.removesuffix("_s"))
        left = [a + b for a, b in zip(left, vals)]
    axes[0].set_xlabel("seconds per step (median)")
    axes[0].legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.1 / len(rows)))
    axes[0].invert_yaxis()
    axes[1].barh(labels, [r["samples_per_s"] for r in ok], color=[colours[0] if r["variant"] == "naive"
                                                                   else colours[2] for r in ok])
    axes[1].set_xlabel("samples / s")
    axes[1].invert_yaxis()
    axes[2].barh(labels, [r["peak_memory_mb"] / 1024 for r in ok], color="grey")
    axes[2].set_xlabel("peak memory (GiB)" if "CPU" not in gpu else "peak RSS (GiB)")
    axes[2].invert_yaxis()
    ratios = "; ".join(f"{s['preset']}: caption {_fmt(s.get('caption_speedup'), 1)}× {s['caption_result']}, "
                       f"samples/s {_fmt(s.get('samples_per_s_speedup'), 2)}× {s['step_result']}" for s in summary)
    fig.suptitle(f"dual-loop training step, naive vs ours - {gpu}\n{ratios}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(rows: list[dict], gpu: str, args, out: Path) -> str:
    """CSV, summary CSV, markdown table and plot of the rows so far; returns the table."""
    summary = summarize(rows, gpu)

    with open(out / "bench_train_step.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k), 6) for k in FIELDS})
    with open(out / "bench_train_step_summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for s in summary:
            w.writerow({k: _fmt(s.get(k), 4) for k in SUMMARY_FIELDS})
    table = markdown(rows, summary, gpu, args)
    (out / "bench_train_step.md").write_text(table)
    try:
        plot(rows, summary, out / "bench_train_step.png", gpu)
    except Exception as e:  # noqa: BLE001 - the numbers are already written
        print(f"[bench_train_step] plot failed: {e}", file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--presets", nargs="+", default=None,
                    help=f"model presets (default: {' '.join(DEFAULT_PRESETS)}; any random preset of "
                         "dualloop/model/presets.py, e.g. sa2va-qwen2_5-3b-shape sa2va-qwen3-4b-shape)")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                    help=f"default: {' '.join(DEFAULT_VARIANTS)} "
                         f"(also: {' '.join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)})")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 8; --quick 1)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warmup steps, excluded (default 3: one-off costs of new shapes; --quick 1)")
    ap.add_argument("--micro-batch", type=int, default=None, help="samples per step (default 4; --quick 2)")
    ap.add_argument("--image-size", type=int, default=None, help="synthetic image side (default 1024; --quick 64)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="caption length (0: the config default, 16; "
                                                                   "--quick 4)")
    ap.add_argument("--max-tiles", type=int, default=1,
                    help="model.max_tiles: VLM tiles per image (Sa2VA: 12; a 1024² image then becomes 3x3 tiles + "
                         "the thumbnail); write to another --out to keep the default results")
    ap.add_argument("--num-workers", type=int, default=None, help="data-loader workers (default 2; --quick 0)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per variant before it is killed "
                                                                "(default 200; --quick 120)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole benchmark; variants that "
                                                               "would start later are recorded as skipped "
                                                               "(default 420; --quick 300)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="auto: bf16 on the GPU, fp32 on the CPU")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 warmup + 1 measured step")
    ap.add_argument("--profile", action="store_true", help="after the measured steps, one more step under "
                    "cProfile per variant: bench_train_step_profile_<preset>_<variant>.txt")
    ap.add_argument("--keep-data", default=None, help="write/reuse the synthetic corpus here instead of a temp dir")
    # worker mode (internal): one preset x variant in this process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--data-config", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.quick
    defaults = {"steps": (1, 8), "warmup": (1, 3), "micro_batch": (2, 4), "image_size": (64, 1024),
                "num_workers": (0, 2), "timeout": (120.0, 200.0), "budget": (300.0, 420.0)}
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if quick and not args.max_new_tokens:
        args.max_new_tokens = 4
    if args.steps < 1 or args.warmup < 0 or args.micro_batch < 1 or args.max_tiles < 1:
        ap.error("--steps, --micro-batch and --max-tiles must be >= 1, --warmup >= 0")
    if args.worker:
        return worker_main(args)

    args.cuda = _cuda_available()
    if not args.cuda and not quick:
        print("bench_train_step: no CUDA device; this benchmark needs a GPU (for a CPU smoke run of the code path: "
              "--quick --presets tiny)", file=sys.stderr)
        return 2
    presets = args.presets or (["tiny"] if not args.cuda else list(DEFAULT_PRESETS))
    if args.cuda:
        import torch

        gpu = torch.cuda.get_device_name(0)
    else:
        import platform

        gpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = worker_env(args.cuda)
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp_name:
        tmp = Path(tmp_name)
        data_root = Path(args.keep_data) if args.keep_data else tmp / "data"
        data_yaml = data_root / "data.yaml"
        if not data_yaml.is_file():
            t0 = time.perf_counter()
            data_yaml = write_bench_corpus(data_root, args.image_size, n_images=16 if not quick else 6)
            print(f"[bench_train_step] synthetic corpus ({args.image_size} px) in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        todo = len(presets) * len(args.variants)
        for preset in presets:
            for variant in args.variants:
                left = args.budget - (time.perf_counter() - t_start)
                share = left / todo  # each variant left gets its share of the budget (a slow one keeps its partial
                todo -= 1            # medians); what a fast one leaves goes to the others
                if left < 30:  # a whole-benchmark limit: the rest is recorded as skipped, not silently dropped
                    rows.append({"gpu": gpu, "preset": preset, "variant": variant, "image_size": args.image_size,
                                 "status": "skipped", "error": f"time budget spent (--budget {args.budget:.0f} s)"})
                    print(f"[bench_train_step] {preset}/{variant} skipped: --budget spent", file=sys.stderr)
                    continue
                print(f"[bench_train_step] === {preset} / {variant} ({gpu})", file=sys.stderr, flush=True)
                row = run_variant(args, preset, variant, data_yaml, tmp, env, min(args.timeout, max(share, 30.0)))
                row.update(gpu=gpu, image_size=args.image_size)
                rows.append(row)
                write_results(rows, gpu, args, out)  # a benchmark killed from outside keeps the variants done
                if _ok(row):
                    steps = " ".join(f"{t:.2f}" for t in row.get("per_step_s", []))
                    print(f"[bench_train_step] {preset}/{variant}: step {row['step_s']:.3f} s, caption "
                          f"{row['caption_s']:.3f} s, {row['samples_per_s']:.2f} samples/s, peak "
                          f"{row['peak_memory_mb']:.0f} MB; build {row['build_s']:.0f} s, wall {row['wall_s']:.0f} s; "
                          f"all steps (s): {steps}", file=sys.stderr, flush=True)
    table = write_results(rows, gpu, args, out)
    print(table)
    print(f"[bench_train_step] total {time.perf_counter() - t_start:.0f} s; results in {out}", file=sys.stderr)
    failed = [f"{r['preset']}/{r['variant']}" for r in rows if r.get("status") != "ok"]
    if failed:
        print(f"[bench_train_step] failed variants: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
