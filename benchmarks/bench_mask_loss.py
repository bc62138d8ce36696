"""Mask-loss benchmark: forward+backward median time and peak extra memory of the SAM2 loss (20·focal + dice of
bilinearly upsampled low-res logits) for eager torch, torch.compile, the Triton kernels and the CUDA extension.

    python benchmarks/bench_mask_loss.py [--out benchmarks/results] [--quick]

Cases: N ∈ {1, 8, 64, 256} at 256²→1024², 64 at 256²→720×1280, and a ragged batch of 64 masks of mixed sizes.
"eager"/"compile" are the usual batched implementation (upsample to fp32 at full resolution, then elementwise passes;
ragged: a Python loop over masks, compiled with dynamic shapes). Times: triton.testing.do_bench median (L2 flushed
between runs), same process and GPU for every backend. Peak extra memory: max_memory_allocated during one fwd+bwd
minus what was allocated before (inputs), the logits' .grad included. Every backend runs in try/except: failures are
recorded in the CSV's `error` column, never abort the run. For the N=64 case, bench_mask_loss_host_{triton,cuda}.txt
hold host-side profiles (ops, CUDA runtime calls, Python functions per call). Writes bench_mask_loss.csv,
bench_mask_loss.png and bench_mask_loss_summary.txt (targets of the issue: N=64 256²→1024², fused ≥10× faster
than torch.compile and ≥50× than eager, peak extra ≤ 1.2·N·h·w·4 B + 1 MB, cuda within 1.5× of triton) under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ALPHA, GAMMA, SMOOTH = 0.25, 2.0, 1.0
RAGGED_SIZES = [(1024, 1024), (720, 1280), (480, 640), (1080, 1920), (512, 512), (300, 400), (200, 150),
                (256, 256)]
BACKENDS = ["eager", "compile", "triton", "cuda"]
# Block-shape variants of the Triton kernels (module constants of mask_loss_triton, patched for the run), timed on
# the N=64 256²→1024² case only: data for tuning on the first GPU run.
TRITON_VARIANTS = {
    "triton@bwd32x32": dict(BWD_LY=32, BWD_LX=32, BWD_RY=16, BWD_RX=128, BWD_WARPS=8),  # the default until 2026-11
    "triton@bwd16x16r32": dict(BWD_RY=32),
    "triton@fwd16x128": dict(FWD_BY=16, FWD_BX=128),
    "triton@tf32": dict(DOT_PRECISION="tf32"),  # one tensor-core pass: faster, ~1e-3 relative gradient error
    "triton@even": dict(EVEN_PATH=True),  # block kernels for exact power-of-two factors (opt-in, untimed)
}
VARIANT_CASE = "N64 256²→1024²"
FIELDS = ["gpu", "case", "backend", "n", "logits_hw", "targets_hw", "median_ms", "gpu_kernel_ms", "peak_extra_mb",
          "budget_mb", "x_vs_compile", "x_vs_eager", "loss_rel_err", "grad_rel_err", "top_kernels", "error"]
PROFILE_ITERS = 10


def naive_losses(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Batched SAM2-style per-mask 20·focal + dice at full resolution (the usual implementation)."""
    xu = F.interpolate(x[:, None].float(), size=t.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    t = t.float()
    p = xu.sigmoid()
    ce = F.binary_cross_entropy_with_logits(xu, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = (ce * (1 - p_t) ** GAMMA * (ALPHA * t + (1 - ALPHA) * (1 - t))).flatten(1).mean(1)
    dice = 1 - (2 * (p * t).flatten(1).sum(1) + SMOOTH) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + SMOOTH)
    return 20 * focal + dice


def make_case(n: int, hw: tuple[int, int], target_hw, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(n, *hw, generator=g, device="cuda") * 3
    if target_hw == "ragged":
        targets = [torch.rand(RAGGED_SIZES[i % len(RAGGED_SIZES)], generator=g, device="cuda") > 0.5
                   for i in range(n)]
    else:
        targets = torch.rand(n, *target_hw, generator=g, device="cuda") > 0.5
    return logits, targets


def loss_fn(backend: str, targets):
    """A function x -> scalar loss for the backend."""
    from dualloop.kernels import mask_loss

    ragged = isinstance(targets, list)
    if backend in ("eager", "compile"):
        f = naive_losses if backend == "eager" else torch.compile(naive_losses, dynamic=ragged)
        if ragged:
            return lambda x: sum(f(x[i:i + 1], t[None]).sum() for i, t in enumerate(targets))
        return lambda x: f(x, targets).sum()
    if backend in TRITON_VARIANTS:
        import dualloop.kernels.mask_loss_triton as mlt

        f = loss_fn("triton", targets)
        f.context = lambda: patched(mlt, TRITON_VARIANTS[backend])
        return f
    def fused(x):
        out = mask_loss(x, targets, resize="logits", alpha=ALPHA, gamma=GAMMA, dice_smooth=SMOOTH, backend=backend)
        return (20 * out.focal + out.dice).sum()

    return fused


@contextlib.contextmanager
def patched(module, values: dict):
    old = {k: getattr(module, k) for k in values}
    try:
        for k, v in values.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def fwd_bwd(f, x):
    x.grad = None
    with getattr(f, "context", contextlib.nullcontext)():
        loss = f(x)
        loss.backward()
    return loss


def peak_extra_bytes(f, x) -> int:
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(f, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def gpu_kernel_time(f, x, iters: int = PROFILE_ITERS) -> tuple[float, str]:
    """(ms of GPU kernel time per fwd+bwd, the 4 longest kernels) from torch.profiler (CUPTI): what the GPU itself
    spends, against median_ms which also holds the host's launch overhead and syncs."""
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd(f, x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fwd_bwd(f, x)
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            per_kernel[e.key] = per_kernel.get(e.key, 0.0) + us
    total = sum(per_kernel.values()) / iters / 1000
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:4]
    return total, "; ".join(f"{k[:60]}={v / iters / 1000:.3f}ms" for k, v in top)


def host_profile(f, x, iters: int = 50) -> str:
    """Where a fused call's wall time goes besides the GPU: torch.profiler's CPU-side ops and CUDA runtime calls
    (counts per call: launches, copies, syncs) and cProfile's Python functions, over `iters` fwd+bwd calls."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    fwd_bwd(f, x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fwd_bwd(f, x)
        torch.cuda.synchronize()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    cprof = cProfile.Profile()
    cprof.enable()
    for _ in range(iters):
        fwd_bwd(f, x)
    torch.cuda.synchronize()
    cprof.disable()
    buf = io.StringIO()
    pstats.Stats(cprof, stream=buf).sort_stats("tottime").print_stats(30)
    return (f"## torch.profiler, {iters} fwd+bwd calls (divide counts by {iters})\n{ops}\n"
            f"## cProfile, {iters} fwd+bwd calls\n{buf.getvalue()}")


def bench_case(name, n, hw, target_hw, backends, gpu, quick, profile_dir: Path | None = None):
    from triton.testing import do_bench

    logits, targets = make_case(n, hw, target_hw)
    t_desc = "ragged" if target_hw == "ragged" else f"{target_hw[0]}x{target_hw[1]}"
    rows, ref = [], None
    for backend in backends:
        row = dict(gpu=gpu, case=name, backend=backend, n=n, logits_hw=f"{hw[0]}x{hw[1]}", targets_hw=t_desc,
                   budget_mb=round((1.2 * n * hw[0] * hw[1] * 4 + 2**20) / 2**20, 2), error="")
        x = logits.clone().requires_grad_(True)
        try:
            f = loss_fn(backend, targets)
            loss = fwd_bwd(f, x).detach()  # warm-up/compile + correctness sample
            grad = x.grad.detach().clone()
            if ref is None and backend == "eager":
                ref = (loss, grad)
            elif ref is not None:
                row["loss_rel_err"] = f"{((loss - ref[0]).abs() / ref[0].abs().clamp_min(1e-12)).item():.2e}"
                row["grad_rel_err"] = f"{((grad - ref[1]).abs().max() / ref[1].abs().max()).item():.2e}"
            row["peak_extra_mb"] = round(peak_extra_bytes(f, x) / 2**20, 2)
            ms = do_bench(lambda f=f, x=x: fwd_bwd(f, x), warmup=10 if quick else 25, rep=40 if quick else 200,
                          return_mode="median")
            row["median_ms"] = round(ms, 4)
            try:
                kernel_ms, top = gpu_kernel_time(f, x)
                row["gpu_kernel_ms"], row["top_kernels"] = round(kernel_ms, 4), top
            except Exception as e:  # the profiler is an extra: its failure must not drop the timing
                row["top_kernels"] = f"profiler failed: {type(e).__name__}: {e}"
            if profile_dir is not None and backend in ("triton", "cuda"):
                try:
                    (profile_dir / f"bench_mask_loss_host_{backend}.txt").write_text(
                        f"# {gpu}, {name}, backend {backend}\n{host_profile(f, x)}")
                except Exception as e:  # noqa: BLE001 - an extra as well
                    print(f"host profile of {backend} failed: {e}", file=sys.stderr)
        except Exception as e:  # record and go on: one broken backend must not hide the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
        finally:
            x.grad = None
            del x
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"{name:>26} {backend:>14}: {row.get('median_ms', '-'):>9} ms (GPU kernels "
              f"{row.get('gpu_kernel_ms', '-')} ms) {row.get('peak_extra_mb', '-'):>9} MB  {row['error']}  "
              f"{row.get('top_kernels', '')}", flush=True)
    by = {r["backend"]: r.get("median_ms") for r in rows}
    for r in rows:
        if r.get("median_ms"):
            if by.get("compile"):
                r["x_vs_compile"] = round(by["compile"] / r["median_ms"], 2)
            if by.get("eager"):
                r["x_vs_eager"] = round(by["eager"] / r["median_ms"], 2)
    return rows


def cases(quick: bool):
    sq, big = (256, 256), (1024, 1024)
    out = [(f"N{n} 256²→1024²", n, sq, big) for n in ((1, 8, 64) if quick else (1, 8, 64, 256))]
    out.append(("N64 256²→720x1280", 64, sq, (720, 1280)))
    out.append(("N64 ragged mixed", 64, sq, "ragged"))
    return out


def summary(rows) -> list[str]:
    """Targets of the issue on the N=64 256²→1024² case."""
    case = [r for r in rows if r["case"] == "N64 256²→1024²"]
    by = {r["backend"]: r for r in case}
    lines = [f"GPU: {rows[0]['gpu'] if rows else '?'}", "N=64, 256²→1024², fwd+bwd of 20·focal + dice:"]
    for b, r in by.items():
        lines.append(f"  {b:>14}: {r.get('median_ms', '-')} ms (GPU kernels {r.get('gpu_kernel_ms', '-')} ms), "
                     f"peak extra {r.get('peak_extra_mb', '-')} MB"
                     f"{'  ERROR ' + r['error'] if r['error'] else ''}")

    def ratio(a, b):
        ra, rb = by.get(a, {}).get("median_ms"), by.get(b, {}).get("median_ms")
        return ra / rb if ra and rb else math.nan

    for fused in ("triton", "cuda"):
        r = by.get(fused, {})
        if not r.get("median_ms"):
            lines.append(f"  {fused}: no timing")
            continue
        vs_c, vs_e = ratio("compile", fused), ratio("eager", fused)
        mem_ok = r.get("peak_extra_mb", math.inf) <= r["budget_mb"]
        lines.append(f"  {fused}: {vs_c:.1f}x vs compile (target >= 10: {'PASS' if vs_c >= 10 else 'MISS'}), "
                     f"{vs_e:.1f}x vs eager (target >= 50: {'PASS' if vs_e >= 50 else 'MISS'}), memory "
                     f"{r.get('peak_extra_mb')} <= {r['budget_mb']} MB: {'PASS' if mem_ok else 'MISS'}")
    c_t = ratio("cuda", "triton")
    lines.append(f"  cuda/triton time ratio {c_t:.2f} (target <= 1.5: {'PASS' if c_t <= 1.5 else 'MISS'})")
    return lines


def plot(rows, path: Path, gpu: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_names = list(dict.fromkeys(r["case"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(len(backends), 1)
    for k, (key, label) in enumerate((("median_ms", "fwd+bwd median (ms, log)"),
                                      ("peak_extra_mb", "peak extra memory (MB, log)"))):
        ax = axes[k]
        for j, b in enumerate(backends):
            vals = []
            for c in case_names:
                r = next((r for r in rows if r["case"] == c and r["backend"] == b), {})
                vals.append(r.get(key) or 0)
            ax.bar([i + j * width for i in range(len(case_names))], vals, width, label=b)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(case_names))], case_names, rotation=25, ha="right",
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Mask loss (bilinear upsample + 20·focal + dice), forward+backward — {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows, out: Path, gpu: str, final: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_mask_loss.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    lines = summary(rows)
    (out / "bench_mask_loss_summary.txt").write_text("\n".join(lines) + "\n")
    if not final:
        return
    print("\n".join(lines))
    try:
        plot(rows, out / "bench_mask_loss.png", gpu)
    except Exception as e:  # a plotting problem must not lose the CSV
        print(f"plot failed: {e}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer cases and shorter timing (smoke run)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help=f"comma list of {BACKENDS}; with triton, the N=64 case also times {list(TRITON_VARIANTS)}")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mask_loss: needs a CUDA GPU (run it via `make gpu-check`)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    backends = [b for b in args.backends.split(",") if b]
    rows = []
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, n, hw, thw in cases(args.quick):
        todo = backends + (list(TRITON_VARIANTS) if name == VARIANT_CASE and "triton" in backends else [])
        try:
            rows += bench_case(name, n, hw, thw, todo, gpu, args.quick,
                               Path(args.out) if name == VARIANT_CASE else None)
        except Exception as e:  # e.g. OOM while making inputs
            rows.append(dict(gpu=gpu, case=name, backend="-", n=n, error=f"{type(e).__name__}: {e}"))
        write_results(rows, Path(args.out), gpu, final=False)  # a run killed from outside keeps the cases done
    write_results(rows, Path(args.out), gpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
