"""`dualloop synth-data`: a small corpus in the four real on-disk layouts, designed to be learnable by a tiny model.

Every scene holds 1–3 shapes from {circle, square, triangle} × {red, green, blue, yellow} × {small, large} on a mildly
textured grey background, each in a different one of five places (left, right, top, bottom, middle), so the
referring expression "the {size} {colour} {shape} {position}" names exactly one region of its image. Captions use
only the agreed vocabulary (see `VOCABULARY`). SA-V videos show 2–3 shapes of distinct colour+shape drifting
slowly, so a caption of frame i still names the same object in frame i + gap.

Layout written under OUT:
    sav/train/sav_000/sav_000001.mp4 + _manual.json (some _auto.json)   sav/val/...      (video layout)
    sav_jpeg/JPEGImages_24fps/<vid>/%05d.jpg + Annotations_6fps/<vid>/<obj:03d>/%05d.png (jpeg layout)
    sav_npz/*.npz                                                                         (npz layout)
    sa1b/train/sa_*.jpg + sa_*.json   sa1b/val/...
    openimages/{train,validation}-annotations-object-segmentation.csv, {split}/<ImageID>.jpg,
        train-masks/train-masks-[0-9a-f]/*.png (16 subfolders), validation-masks/*.png (flat),
        oidv7-class-descriptions.csv
    refcoco/refcoco/instances.json + refs(unc).p (train/val/testA/testB), refcoco/images/COCO_train2014_*.jpg
    data.yaml  (data.datasets for training; data.eval_datasets: held-out splits/roots)
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import yaml
from PIL import Image

from .masks import encode_rle

VOCABULARY = ("the a small large red green blue yellow circle square triangle on at in left right top bottom "
              "middle").split()
COLOURS = {"red": (220, 45, 40), "green": (40, 175, 60), "blue": (45, 85, 225), "yellow": (235, 210, 35)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.085, "large": 0.135}  # radius / image side
POSITIONS = {"on the left": (0.18, 0.5), "on the right": (0.82, 0.5), "at the top": (0.5, 0.18),
             "at the bottom": (0.5, 0.82), "in the middle": (0.5, 0.5)}
JITTER = 0.025
N_FRAMES, FPS, ANN_EVERY = 32, 24, 4


# ---------------------------------------------------------------------------------------------------- drawing
def shape_polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Vertices (N, 2) of a shape centred at (cx, cy) with radius r (pixels)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    if shape == "square":
        s = 0.85 * r
        return np.array([[cx - s, cy - s], [cx + s, cy - s], [cx + s, cy + s], [cx - s, cy + s]])
    if shape == "triangle":
        t = np.deg2rad([-90, 30, 150])
        return np.stack([cx + 1.1 * r * np.cos(t), cy + 1.15 * r * np.sin(t) + 0.1 * r], 1)
    raise ValueError(f"unknown shape {shape!r}")


def rasterize(poly: np.ndarray, size: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return m


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Mild texture: grey level + gradient + faint stripes + noise, slightly tinted."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(95, 150)
    grad = rng.uniform(-20, 20) * (xx - 0.5) + rng.uniform(-20, 20) * (yy - 0.5)
    theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(3, 8), rng.uniform(0, 2 * np.pi)
    stripes = 5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    grey = base + grad + stripes + rng.normal(0, 4, (size, size))
    img = grey[..., None] + rng.uniform(-6, 6, 3)[None, None, :] + rng.normal(0, 2, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def paint(img: np.ndarray, mask: np.ndarray, colour: str, rng: np.random.Generator) -> None:
    ys, xs = np.nonzero(mask)
    rgb = np.asarray(COLOURS[colour], np.float32)[None, :] + rng.normal(0, 6, (len(ys), 3))
    img[ys, xs] = np.clip(rgb, 0, 255).astype(np.uint8)


def sample_objects(rng: np.random.Generator, size: int, n: int, distinct_kind: bool = False) -> list[dict]:
    """n objects in distinct places that do not touch; distinct_kind: distinct (colour, shape) pairs too."""
    for _ in range(200):
        places = rng.choice(len(POSITIONS), n, replace=False)
        objs = []
        for p in places:
            position = list(POSITIONS)[p]
            fx, fy = POSITIONS[position]
            sz = list(SIZES)[rng.integers(2)]
            objs.append({"position": position, "size": sz, "colour": list(COLOURS)[rng.integers(4)],
                         "shape": SHAPES[rng.integers(3)], "r": SIZES[sz] * size,
                         "cx": (fx + rng.uniform(-JITTER, JITTER)) * size,
                         "cy": (fy + rng.uniform(-JITTER, JITTER)) * size})
        if distinct_kind and len({(o["colour"], o["shape"]) for o in objs}) < n:
            continue
        if _apart(objs):
            return objs
    raise RuntimeError("could not place non-touching shapes")  # practically unreachable for n ≤ 3


def _apart(objs: list[dict], margin: float = 2.0) -> bool:
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            d = np.hypot(objs[a]["cx"] - objs[b]["cx"], objs[a]["cy"] - objs[b]["cy"])
            if d < 1.15 * (objs[a]["r"] + objs[b]["r"]) + margin:
                return False
    return True


def render(rng: np.random.Generator, size: int, objs: list[dict], bg: np.ndarray | None = None):
    """(image HxWx3, [mask HxW], [polygon]) of objects drawn on a (new or given) background."""
    img = (background(rng, size) if bg is None else bg).copy()
    masks, polys = [], []
    for o in objs:
        poly = shape_polygon(o["shape"], o["cx"], o["cy"], o["r"])
        m = rasterize(poly, size)
        paint(img, m, o["colour"], rng)
        masks.append(m)
        polys.append(poly)
    return img, masks, polys


def expressions(obj: dict, others: list[dict], rng: np.random.Generator) -> list[str]:
    """The full expression first, then one shorter variant that is still unique within the image."""
    full = f"the {obj['size']} {obj['colour']} {obj['shape']} {obj['position']}"
    unique = []
    for keys, text in ((("colour", "shape"), f"the {obj['colour']} {obj['shape']}"),
                       (("size", "colour", "shape"), f"the {obj['size']} {obj['colour']} {obj['shape']}"),
                       (("colour", "shape", "position"), f"the {obj['colour']} {obj['shape']} {obj['position']}"),
                       (("shape", "position"), f"the {obj['shape']} {obj['position']}")):
        if all(any(o[k] != obj[k] for k in keys) for o in others):
            unique.append(text)
    return [full] + ([unique[rng.integers(len(unique))]] if unique else [])


def save_jpeg(path, img: np.ndarray) -> None:
    Image.fromarray(img).save(path, quality=95)


def bbox_xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# ---------------------------------------------------------------------------------------------------- SA-V
def _video_objects(rng, size):
    """Objects with a start and an end centre; non-touching and inside the frame at every frame."""
    for _ in range(200):
        objs = sample_objects(rng, size, int(rng.integers(2, 4)), distinct_kind=True)
        for o in objs:
            ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.04, 0.10) * size
            o["dx"], o["dy"] = dist * np.cos(ang), dist * np.sin(ang)
        ok = True
        for t in np.linspace(0, 1, N_FRAMES):
            at = [dict(o, cx=o["cx"] + t * o["dx"], cy=o["cy"] + t * o["dy"]) for o in objs]
            inside = all(1.2 * o["r"] + 1 <= c <= size - 1.2 * o["r"] - 1 for o in at for c in (o["cx"], o["cy"]))
            if not (inside and _apart(at)):
                ok = False
                break
        if ok:
            return objs
    raise RuntimeError("could not place moving shapes")


def _render_video(rng, size, late_object: bool):
    objs = _video_objects(rng, size)
    bg = background(rng, size)
    first_seen = [2 * ANN_EVERY if (late_object and k == 0) else 0 for k in range(len(objs))]
    frames, masks = [], []  # masks[f][obj]
    for f in range(N_FRAMES):
        t = f / (N_FRAMES - 1)
        visible = [dict(o, cx=o["cx"] + t * o["dx"], cy=o["cy"] + t * o["dy"]) for k, o in enumerate(objs)
                   if f >= first_seen[k]]
        img, ms, _ = render(rng, size, visible, bg=bg)
        full = []
        it = iter(ms)
        for k in range(len(objs)):
            full.append(next(it) if f >= first_seen[k] else np.zeros((size, size), np.uint8))
        frames.append(img)
        masks.append(full)
    return objs, frames, masks


def write_mp4(path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as c:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        s = c.add_stream(codec, rate=FPS)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        s.codec_context.thread_count = 1  # also the encoder's pixel converter: see sav.ONE_THREAD
        s.options = {"crf": "10", "preset": "ultrafast"} if codec == "libx264" else {}
        if codec != "libx264":
            s.bit_rate = 4_000_000
        for fr in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def _masklet_json(vid: str, masks, size, absent_as_null: bool, tag: str) -> dict:
    n_obj = len(masks[0])
    masklet = []
    for f in range(0, N_FRAMES, ANN_EVERY):
        row = []
        for k in range(n_obj):
            m = masks[f][k]
            row.append(None if (absent_as_null and not m.any()) else encode_rle(m))
        masklet.append(row)
    first = [next(f for f in range(N_FRAMES) if masks[f][k].any()) for k in range(n_obj)]
    return {"video_id": vid, "video_duration": N_FRAMES / FPS, "video_frame_count": N_FRAMES,
            "video_height": size, "video_width": size, "video_resolution": size * size,
            "video_environment": "Indoor", "video_split": "train", "masklet": masklet,
            "masklet_id": list(range(n_obj)), "masklet_first_appeared_frame": first,
            "masklet_frame_count": [len(masklet)] * n_obj, "masklet_type": [tag] * n_obj, "masklet_num": n_obj}


def write_sav_videos(root: Path, rng, n_videos: int, size: int, start_id: int) -> None:
    for v in range(n_videos):
        vid = f"sav_{start_id + v:06d}"
        folder = root / f"sav_{(start_id + v) // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        _, frames, masks = _render_video(rng, size, late_object=(v % 3 == 1))
        write_mp4(folder / f"{vid}.mp4", frames)
        with open(folder / f"{vid}_manual.json", "w") as f:
            json.dump(_masklet_json(vid, masks, size, absent_as_null=(v % 2 == 0), tag="manual"), f)
        if v % 3 == 0:
            with open(folder / f"{vid}_auto.json", "w") as f:
                json.dump(_masklet_json(vid, masks, size, absent_as_null=False, tag="auto"), f)


def write_sav_jpeg(root: Path, rng, n_videos: int, size: int) -> None:
    for v in range(n_videos):
        vid = f"sav_{900000 + v:06d}"
        _, frames, masks = _render_video(rng, size, late_object=(v == 0))
        fdir = root / "JPEGImages_24fps" / vid
        fdir.mkdir(parents=True, exist_ok=True)
        for f, fr in enumerate(frames):
            save_jpeg(fdir / f"{f:05d}.jpg", fr)
        for k in range(len(masks[0])):
            odir = root / "Annotations_6fps" / vid / f"{k:03d}"
            odir.mkdir(parents=True, exist_ok=True)
            for f in range(0, N_FRAMES, ANN_EVERY):
                m = masks[f][k]
                if v % 2:  # palette PNG with index 1 = object (as the official release)
                    im = Image.fromarray(m, mode="L").convert("P")
                    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
                    im.save(odir / f"{f:05d}.png")
                else:
                    Image.fromarray(m * 255).save(odir / f"{f:05d}.png")


def write_sav_npz(root: Path, rng, n_pairs: int, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    stacked = []
    for k in range(n_pairs):
        _, frames, masks = _render_video(rng, size, late_object=False)
        pair = {"frame1": frames[0], "mask1": masks[0][0], "frame2": frames[4 * ANN_EVERY],
                "mask2": masks[4 * ANN_EVERY][0]}
        np.savez_compressed(root / f"pair_{k:04d}.npz", **pair)
        stacked.append(pair)
    np.savez(root / "pairs_batch.npz", **{key: np.stack([p[key] for p in stacked]) for key in stacked[0]})


# ---------------------------------------------------------------------------------------------------- SA-1B
def write_sa1b(root: Path, rng, n_images: int, size: int, start_id: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ann_id = start_id * 10
    for k in range(n_images):
        n = start_id + k
        objs = sample_objects(rng, size, int(rng.integers(1, 4)))
        img, masks, _ = render(rng, size, objs)
        save_jpeg(root / f"sa_{n}.jpg", img)
        anns = []
        for o, m in zip(objs, masks):
            ann_id += 1
            anns.append({"id": ann_id, "segmentation": encode_rle(m), "area": int(m.sum()), "bbox": bbox_xywh(m),
                         "predicted_iou": float(np.round(rng.uniform(0.8, 1.0), 4)),
                         "stability_score": float(np.round(rng.uniform(0.9, 1.0), 4)),
                         "point_coords": [[float(o["cx"]), float(o["cy"])]], "crop_box": [0, 0, size, size]})
        record = {"image": {"image_id": n, "width": size, "height": size, "file_name": f"sa_{n}.jpg"},
                  "annotations": anns}
        with open(root / f"sa_{n}.json", "w") as f:
            json.dump(record, f)


# ---------------------------------------------------------------------------------------------------- OpenImages
def label_mid(colour: str, shape: str) -> str:
    return f"/m/0syn{list(COLOURS).index(colour)}{SHAPES.index(shape)}"


def write_openimages(root: Path, rng, split: str, n_images: int, size: int, subfolders: bool) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    mask_root = root / f"{split}-masks"
    mask_root.mkdir(parents=True, exist_ok=True)
    header = ["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
              "PredictedIoU", "Clicks"]
    lines = [",".join(header)]
    row = 0
    for _ in range(n_images):
        image_id = "".join(rng.choice(list("0123456789abcdef"), 16))
        objs = sample_objects(rng, size, int(rng.integers(1, 4)))
        img, masks, _ = render(rng, size, objs)
        save_jpeg(root / split / f"{image_id}.jpg", img)
        for o, m in zip(objs, masks):
            mid = label_mid(o["colour"], o["shape"])
            box_id = "".join(rng.choice(list("0123456789abcdef"), 8))
            name = f"{image_id}_{mid.replace('/m/', 'm')}_{box_id}.png"
            folder = mask_root / f"{split}-masks-{name[0]}" if subfolders else mask_root
            folder.mkdir(exist_ok=True)
            if row % 7 == 3:  # stored at twice the image size: the reader resizes (nearest) back exactly
                Image.fromarray(np.kron(m, np.ones((2, 2), np.uint8)) * 255).save(folder / name)
            elif row % 2:
                Image.fromarray(m.astype(bool)).save(folder / name)  # 1-bit PNG
            else:
                Image.fromarray(m * 255).save(folder / name)
            x, y, w, h = bbox_xywh(m)
            lines.append(f"{name},{image_id},{mid},{box_id},{x / size:.6f},{(x + w) / size:.6f},{y / size:.6f},"
                         f"{(y + h) / size:.6f},{rng.uniform(0.5, 1):.5f},")
            row += 1
    if subfolders:
        for c in "0123456789abcdef":
            (mask_root / f"{split}-masks-{c}").mkdir(exist_ok=True)
    (root / f"{split}-annotations-object-segmentation.csv").write_text("\n".join(lines) + "\n")


def write_class_descriptions(root: Path) -> None:
    lines = ["LabelName,DisplayName"]
    for colour in COLOURS:
        for shape in SHAPES:
            lines.append(f"{label_mid(colour, shape)},{colour.capitalize()} {shape}")
    (root / "oidv7-class-descriptions.csv").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------- RefCOCO
def write_refcoco(root: Path, rng, n_images: int, size: int) -> None:
    image_dir, ann_dir = root / "images", root / "refcoco"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": 1 + c * 3 + s, "name": f"{colour} {shape}", "supercategory": "shape"}
                  for c, colour in enumerate(COLOURS) for s, shape in enumerate(SHAPES)]
    images, anns, refs = [], [], []
    ann_id = sent_id = 0
    splits = rng.permutation(np.resize(["train"] * 14 + ["val"] * 3 + ["testA", "testB"] + ["train"], n_images))
    for k in range(n_images):
        image_id = 100000 + k
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        objs = sample_objects(rng, size, int(rng.integers(1, 4)))
        img, masks, polys = render(rng, size, objs)
        save_jpeg(image_dir / file_name, img)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for j, (o, m, poly) in enumerate(zip(objs, masks, polys)):
            ann_id += 1
            cat = 1 + list(COLOURS).index(o["colour"]) * 3 + SHAPES.index(o["shape"])
            seg = [np.round(poly, 2).reshape(-1).tolist()] if ann_id % 2 else encode_rle(m)
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg,
                         "area": float(m.sum()), "bbox": bbox_xywh(m), "iscrowd": 0})
            sentences = []
            for text in expressions(o, objs[:j] + objs[j + 1:], rng):
                sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
                sent_id += 1
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": str(splits[k]),
                         "sentences": sentences, "category_id": cat,
                         "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                         "sent_ids": [s["sent_id"] for s in sentences]})
    with open(ann_dir / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    with open(ann_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)


# ---------------------------------------------------------------------------------------------------- corpus
def write_synthetic_corpus(out_dir, seed: int = 0, scale: int = 1, image_size: int = 64) -> dict:
    """Write the corpus (all four layouts + data.yaml) under out_dir; returns {name: path}.

    `scale` multiplies the number of samples; `image_size` is the side of every image and video frame.
    """
    if int(scale) < 1:
        raise ValueError(f"scale must be ≥ 1, got {scale!r}")
    if int(image_size) < 32 or int(image_size) % 2:
        raise ValueError(f"image_size must be an even number ≥ 32, got {image_size!r}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    s, size = int(scale), int(image_size)
    rng = [np.random.default_rng([int(seed), k]) for k in range(10)]
    paths = {"root": out, "sav": out / "sav" / "train", "sav_val": out / "sav" / "val", "sav_jpeg": out / "sav_jpeg",
             "sav_npz": out / "sav_npz", "sa1b": out / "sa1b" / "train", "sa1b_val": out / "sa1b" / "val",
             "openimages": out / "openimages", "refcoco": out / "refcoco", "refcoco_images": out / "refcoco" / "images"}
    write_sav_videos(paths["sav"], rng[0], 12 * s, size, start_id=1)
    write_sav_videos(paths["sav_val"], rng[1], 4 * s, size, start_id=500000)
    write_sav_jpeg(paths["sav_jpeg"], rng[2], 3 * s, size)
    write_sav_npz(paths["sav_npz"], rng[3], 3 * s, size)
    write_sa1b(paths["sa1b"], rng[4], 60 * s, size, start_id=1)
    write_sa1b(paths["sa1b_val"], rng[5], 16 * s, size, start_id=800000)
    write_openimages(paths["openimages"], rng[6], "train", 60 * s, size, subfolders=True)
    write_openimages(paths["openimages"], rng[7], "validation", 16 * s, size, subfolders=False)
    write_class_descriptions(paths["openimages"])
    write_refcoco(paths["refcoco"], rng[8], 160 * s, size)
    p = {k: str(v) for k, v in paths.items()}
    config = {"data": {
        "seed": int(seed),
        "datasets": [
            {"name": "sav", "kind": "sav", "root": p["sav"], "repeats": 2},
            {"name": "sav_jpeg", "kind": "sav", "root": p["sav_jpeg"], "repeats": 1},
            {"name": "sa1b", "kind": "sa1b", "root": p["sa1b"], "repeats": 1},
            {"name": "openimages", "kind": "openimages", "root": p["openimages"], "repeats": 1, "split": "train"},
            {"name": "refcoco", "kind": "refcoco", "root": p["refcoco"], "repeats": 4, "split": "train",
             "image_root": p["refcoco_images"]},
        ],
        "eval_datasets": [
            {"name": "sav_val", "kind": "sav", "root": p["sav_val"]},
            {"name": "sa1b_val", "kind": "sa1b", "root": p["sa1b_val"]},
            {"name": "openimages_val", "kind": "openimages", "root": p["openimages"], "split": "validation"},
            {"name": "refcoco_val", "kind": "refcoco", "root": p["refcoco"], "split": "val",
             "image_root": p["refcoco_images"]},
        ],
    }}
    config_path = out / "data.yaml"
    with open(config_path, "w") as f:
        f.write("# Synthetic corpus written by `dualloop synth-data`; datasets train, eval_datasets are held out.\n")
        yaml.safe_dump(config, f, sort_keys=False)
    p["config"] = str(config_path)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dualloop synth-data", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=1, help="multiplies the number of samples (not the resolution)")
    ap.add_argument("--image-size", type=int, default=64, help="side of every image / video frame in pixels")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        paths = write_synthetic_corpus(args.out, seed=args.seed, scale=args.scale, image_size=args.image_size)
    except (ValueError, OSError) as e:
        print(f"synth-data: {e}", file=sys.stderr)
        return 2
    print(f"wrote synthetic corpus to {paths['root']} in {time.time() - t0:.1f}s; config: {paths['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
