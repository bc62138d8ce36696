"""What a new sequence length costs in attention on this GPU: forward + backward of SDPA with an additive mask (how
transformers calls it for left-padded batches) at lengths never seen before (first call) and again (second call),
per backend: torch's own choice, each backend forced, and dualloop's choice (`model.cudnn_attention: false`).

    python benchmarks/bench_sdpa_shapes.py [--out benchmarks/results]

Writes bench_sdpa_shapes.csv (backend, length, first_ms, again_ms, error) and prints the medians.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# the LLM of sa2va-1b-shape (Qwen2.5-0.5B: 14 heads of 64), 4 samples, prompt + caption lengths around 300
BATCH, HEADS, HEAD_DIM, NEW_LENGTHS = 4, 14, 64, 10


def fwd_bwd_ms(length: int) -> float:
    q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    keep = torch.ones(length, length, device="cuda", dtype=torch.bool).tril()
    mask = torch.zeros(BATCH, 1, length, length, device="cuda", dtype=torch.bfloat16)
    mask.masked_fill_(~keep, torch.finfo(torch.bfloat16).min)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sdpa_shapes: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dualloop.model.build import select_attention_backends

    # "default": torch's own choice; "dualloop": the choice once a model is built with model.cudnn_attention false
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH, "dualloop": None}
    fwd_bwd_ms(64)  # CUDA context, allocator, cuBLAS handles
    rows = []
    for i, (name, backend) in enumerate(backends.items()):
        for length in range(301 + 16 * i, 301 + 16 * i + NEW_LENGTHS):  # lengths no earlier backend saw
            row = {"backend": name, "length": length, "first_ms": "", "again_ms": "", "error": ""}
            if name == "dualloop":
                select_attention_backends(cudnn=False)
            try:
                with sdpa_kernel(backend) if backend is not None else torch.enable_grad():
                    row["first_ms"] = round(fwd_bwd_ms(length), 3)
                    row["again_ms"] = round(fwd_bwd_ms(length), 3)
            except Exception as e:  # noqa: BLE001 - a backend that cannot run this case is recorded
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
        ok = [r for r in rows if r["backend"] == name and not r["error"]]
        if ok:
            print(f"{name:>9}: new length {statistics.median(r['first_ms'] for r in ok):8.2f} ms, "
                  f"seen length {statistics.median(r['again_ms'] for r in ok):8.2f} ms (median of {len(ok)})")
        else:
            print(f"{name:>9}: unavailable ({rows[-1]['error']})")
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; cudnn_sdp enabled: "
          f"{torch.backends.cuda.cudnn_sdp_enabled()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_sdpa_shapes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
