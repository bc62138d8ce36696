"""The Qwen2.5-VL-3B vision tower (the `sa2va-qwen2_5-3b-shape` preset's) on a step's images: transformers' attention
per chunk (one call per 112 px window in 28 of its 32 layers) against dualloop's batched chunks
(`dualloop.model.window_attention`), same run, same weights, frozen (no grad, as in a training step).

    python benchmarks/bench_vision_tower.py --out benchmarks/results            # GPU: the real widths, bf16
    python benchmarks/bench_vision_tower.py --hidden 128 --heads 2 --out /tmp/b  # CPU: narrow layers, same chunks

Writes bench_vision_tower.csv (device, widths, images, tokens, chunks, variant, median ms, SDPA calls, max abs
difference of the outputs) and prints the ratio.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch


def build_tower(hidden: int | None, heads: int | None, depth: int | None, dtype, device):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from dualloop.model.presets import _QWEN25_VL_3B_VISION

    kw = dict(_QWEN25_VL_3B_VISION)
    if hidden:
        kw.update(hidden_size=hidden, intermediate_size=hidden * 8 // 3)
    if heads:
        kw["num_heads"] = heads
    if depth:
        kw["depth"] = depth
        kw["fullatt_block_indexes"] = [i for i in kw["fullatt_block_indexes"] if i < depth]
    cfg = Qwen2_5_VLVisionConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return Qwen2_5_VisionTransformerPretrainedModel(cfg).to(device, dtype).eval(), cfg


def timed_ms(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--images", type=int, default=4, help="images per tower call (a micro-batch of 4 SA-1B samples)")
    ap.add_argument("--size", type=int, default=1024, help="image side in px, resized by Qwen's rule (default budget)")
    ap.add_argument("--hidden", type=int, help="narrower layers than the 3B's 1280 (CPU runs); chunks unchanged")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from dualloop.config import ModelConfig
    from dualloop.model.vision_families import smart_resize
    from dualloop.model.window_attention import batch_chunk_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    tower, cfg = build_tower(args.hidden, args.heads, args.depth, dtype, device)
    mc = ModelConfig()
    h, w = smart_resize(args.size, args.size, cfg.patch_size * cfg.spatial_merge_size, mc.min_pixels, mc.max_pixels)
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    px = torch.randn(args.images * gh * gw, 3 * cfg.temporal_patch_size * cfg.patch_size ** 2, device=device,
                     dtype=dtype)
    thw = torch.tensor([[1, gh, gw]] * args.images, device=device)
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # merged tokens per window side
    windows = args.images * -(-gh // cfg.spatial_merge_size // side) * -(-gw // cfg.spatial_merge_size // side)

    calls = [0]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls[0] += 1
        return sdpa(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = counting

    def run():
        with torch.no_grad():
            return tower(px, grid_thw=thw).last_hidden_state

    rows, outs = [], {}
    for variant in ("per_chunk", "batched"):  # transformers' own tower first, then with dualloop's attention
        if variant == "batched":
            batch_chunk_attention(tower)
        outs[variant] = run()  # warm-up (and the output compared below)
        calls[0] = 0
        run()
        n_calls = calls[0]
        ms = timed_ms(run, device, args.repeats)
        rows.append({"device": name, "hidden": cfg.hidden_size, "heads": cfg.num_heads, "depth": cfg.depth,
                     "images": args.images, "tokens": gh * gw * args.images, "windows": windows, "variant": variant,
                     "median_ms": round(ms, 2), "sdpa_calls": n_calls})
        print(f"[bench_vision_tower] {name} {variant}: {ms:.1f} ms per tower call, {n_calls} SDPA calls", flush=True)
    diff = (outs["batched"].float() - outs["per_chunk"].float()).abs().max().item()
    for r in rows:
        r["max_abs_diff"] = f"{diff:.3g}"
    ratio = rows[0]["median_ms"] / rows[1]["median_ms"]
    print(f"[bench_vision_tower] per_chunk / batched: {ratio:.2f}x; outputs differ by at most {diff:.3g} "
          f"({args.images} images of {h}x{w} px, {windows} windows, hidden {cfg.hidden_size}, {dtype})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_vision_tower.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
