"""SA-V: pairs of frames of the same object (image1/mask1 = anchor frame, image2/mask2 = anchor + gap).

Four layouts (autodetected, or `layout=`):
- video: `sav_XXXXXX.mp4` + `sav_XXXXXX_manual.json` (and/or `_auto.json`) anywhere under root; `masklet[i][obj]`
  is a COCO RLE (null/empty when absent) of annotated frame i = video frame `ann_every · i`; frames decoded with PyAV
  and turned upright as OpenCV's VideoCapture turns them (see `display_turns`), so they match SAM2's extracted frames.
- frames: the same JSONs, the frames extracted as SAM2's training expects them
  (sam2 `training/scripts/sav_frame_extraction_submitit.py`): `<frames_dir>/sav_XXXXXX/<frame:05d>.jpg`, every
  `ann_every`-th video frame, named by its video frame number. `frames_dir` may lie outside root (SAM2's img_folder).
- jpeg: `JPEGImages_24fps/<video>/<frame:05d>.jpg` + `Annotations_6fps/<video>/<obj:03d>/<frame:05d>.png`.
- npz: `*.npz` with arrays frame1, mask1, frame2, mask2 (frames HxWx3 uint8; or with a leading pair axis).
"""
from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from functools import lru_cache, partial

import av
import numpy as np

from .base import DataError, Reader, check_root, list_dir, make_item, walk
from .index import cached_index, file_signature
from .masks import BadSample, decode_rle, read_image, read_png_mask, rle_area

INDEX_VERSION = 2
LAYOUTS = ("video", "frames", "jpeg", "npz")
ANNOTATIONS = {"manual": ("_manual.json",), "auto": ("_auto.json",), "both": ("_manual.json", "_auto.json")}


def select_anchors(present: np.ndarray, gap: int, pairs_per_object: int | None) -> list[int]:
    """Anchors i with the object present at i and i+gap; k of them at round(linspace(0, m-1, k)), deduplicated."""
    n = len(present)
    valid = [i for i in range(n - gap) if present[i] and present[i + gap]]
    if pairs_per_object is None or not valid:
        return valid
    positions = np.round(np.linspace(0, len(valid) - 1, int(pairs_per_object))).astype(np.int64)
    return [valid[p] for p in dict.fromkeys(positions.tolist())]


@lru_cache(maxsize=4)
def _load_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BadSample(path, f"unreadable annotation JSON: {e}") from e


def display_turns(frame: av.VideoFrame) -> int:
    """Quarter turns counter-clockwise (np.rot90's k, 0..3) that show `frame` as OpenCV's VideoCapture does.

    PyAV returns frames as stored; an mp4 may carry a display matrix (phones: `tkhd` rotation) that players and
    cv2 (CAP_PROP_ORIENTATION_AUTO, on by default) apply. SAM2 extracts SA-V's training frames with cv2
    (`sav_frame_extraction_submitit.py`), and the masklets are sized like those. cv2 (`applyMetadataRotation`)
    rounds FFmpeg's `av_display_rotation_get` (counter-clockwise degrees) to an integer and rotates only by multiples
    of 90°: other angles and the matrix's mirror part are ignored; the same here. Computed from the matrix itself
    because PyAV's `VideoFrame.rotation` truncates rather than rounds.
    """
    for sd in frame.side_data:
        if sd.type.name != "DISPLAYMATRIX":
            continue
        m = struct.unpack("<9i", bytes(sd)[:36])
        scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
        if scale0 == 0 or scale1 == 0:
            return 0
        ccw = -round(math.degrees(math.atan2(m[1] / scale1, m[0] / scale0)))  # av_display_rotation_get, rounded
        return (ccw // 90) % 4 if ccw % 90 == 0 else 0
    return 0


# PyAV >= 17 converts a frame's pixels on a pool of slice threads (threads=0: one per core), joined when the frame's
# converter is freed. Reading `frame.side_data` (display_turns) puts the frame in a reference cycle, so the parent
# frees it only at a garbage collection; one still pending when the DataLoader forks its workers is collected in a
# worker, which then waits for threads that exist only in the parent: the worker hangs (seen in the tests). One
# thread makes no pool; the workers are the parallelism. Any other frame conversion needs it too.
ONE_THREAD = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def _decode(path: str, wanted: list[int], seek: bool) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        tb = stream.time_base
        start = stream.start_time or 0
        use_pts = bool(rate and tb)
        if seek and use_pts and wanted[0] > 0:
            container.seek(int(start + wanted[0] / (rate * tb)), stream=stream, backward=True, any_frame=False)
        counter = 0
        for frame in container.decode(stream):
            idx = int(round(float((frame.pts - start) * tb * rate))) if use_pts and frame.pts is not None else counter
            counter += 1
            if idx in wanted and idx not in out:
                image = frame.to_ndarray(format="rgb24", **ONE_THREAD)
                turns = display_turns(frame)
                out[idx] = np.ascontiguousarray(np.rot90(image, turns)) if turns else image
            if idx >= wanted[-1]:
                break
    return out


def read_video_frames(path: str, indices: list[int]) -> dict[int, np.ndarray]:
    """Decode the frames at `indices` (0-based, presentation order) of a video → {index: uint8 [H, W, 3]}, upright
    (rotated by the display matrix as cv2 does: `display_turns`).

    Seeks to the keyframe before the first wanted frame and decodes forward (frame numbers from timestamps); if the
    seek lands past a wanted frame, decodes again from the start.
    """
    wanted = sorted(set(int(i) for i in indices))
    try:
        out = _decode(path, wanted, seek=True)
        if len(out) < len(wanted) and wanted[0] > 0:
            out = _decode(path, wanted, seek=False)
    except (av.FFmpegError, OSError, IndexError, ValueError) as e:
        raise BadSample(path, f"cannot decode video: {e}") from e
    lost = [i for i in wanted if i not in out]
    if lost:
        raise BadSample(path, f"video has no frame(s) {lost} (decoded up to frame {max(out, default=-1)})")
    return out


def _npz_pairs(path: str) -> list[int]:
    """Pair positions in an npz, from the header of frame1 only: [-1] for HxWx3 (no pair axis), 0..N-1 for NxHxWx3."""
    with zipfile.ZipFile(path) as z, z.open("frame1.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape = read_header(f)[0]
    if len(shape) == 4:
        return list(range(int(shape[0])))
    if len(shape) == 3:
        return [-1]
    raise ValueError(f"frame1 has shape {shape}, expected HxWx3 or NxHxWx3")


class SAVDataset(Reader):
    kind = "sav"

    def __init__(self, root, *, layout: str | None = None, annotations: str = "manual", ann_every: int = 4,
                 frame_gap: int = 4, pairs_per_object: int | None = 4, frames_dir: str = "JPEGImages_24fps",
                 masks_dir: str = "Annotations_6fps", max_bad_fraction: float = 0.01, seed: int = 0):
        super().__init__(root, max_bad_fraction=max_bad_fraction, seed=seed)
        looked_for = ("sav_*.mp4 + sav_*_manual.json (video layout), sav_*_manual.json + frames_dir/sav_*/*.jpg "
                      "(frames layout), JPEGImages_24fps/ + Annotations_6fps/ (jpeg layout) or *.npz (npz layout)")
        check_root(self.kind, self.root, looked_for)
        if annotations not in ANNOTATIONS:
            raise ValueError(f"sav: annotations must be one of {sorted(ANNOTATIONS)}, got {annotations!r}")
        if layout not in (None, *LAYOUTS):
            raise ValueError(f"sav: layout must be one of {LAYOUTS} or None (autodetect), got {layout!r}")
        if int(ann_every) < 1 or int(frame_gap) < 1:
            raise ValueError(f"sav: ann_every and frame_gap must be ≥ 1, got {ann_every}, {frame_gap}")
        if pairs_per_object is not None and int(pairs_per_object) < 1:
            raise ValueError(f"sav: pairs_per_object must be ≥ 1 or None, got {pairs_per_object!r}")
        self.ann_every, self.frame_gap = int(ann_every), int(frame_gap)
        self.frames_dir = os.path.join(self.root, frames_dir)
        self.masks_dir = os.path.join(self.root, masks_dir)
        files = None
        if layout is None:
            layout, files = self._detect_layout(looked_for)
        self.layout = layout
        options = {"layout": layout, "annotations": annotations, "ann_every": self.ann_every,
                   "frame_gap": self.frame_gap, "pairs_per_object": pairs_per_object}
        if layout == "jpeg":
            for d in (self.frames_dir, self.masks_dir):
                if not os.path.isdir(d):
                    raise DataError(f"sav: jpeg layout needs {d}")
            options.update(frames_dir=frames_dir, masks_dir=masks_dir)
            signature = self._jpeg_signature()
            build = partial(_build_jpeg, self.frames_dir, self.masks_dir, self.ann_every, self.frame_gap,
                            pairs_per_object)
        else:
            files = files if files is not None else walk(self.root, (".json", ".mp4", ".npz"))
            if layout in ("video", "frames"):
                suffixes = ANNOTATIONS[annotations]
                jsons = [f for f in files if f.endswith(suffixes)]
                if not jsons:
                    raise DataError(f"sav: no *{'/*'.join(suffixes)} files under {self.root} (annotations="
                                    f"{annotations!r})")
                videos = {f for f in files if f.endswith(".mp4")}
                signature = file_signature(jsons) + file_signature(sorted({os.path.dirname(f) for f in jsons}))
                frame_folders = None
                if layout == "frames":
                    if not os.path.isdir(self.frames_dir):
                        raise DataError(f"sav: frames layout needs the extracted frames in frames_dir "
                                        f"{self.frames_dir} (<frames_dir>/sav_XXXXXX/<frame:05d>.jpg)")
                    options.update(frames_dir=self.frames_dir)
                    frame_folders = _frame_folders(jsons, suffixes, self.frames_dir)
                    signature += file_signature([self.frames_dir] + frame_folders)
                build = partial(_build_video, jsons, videos, suffixes, self.ann_every, self.frame_gap,
                                pairs_per_object, frame_folders)
            else:
                npzs = [f for f in files if f.endswith(".npz")]
                if not npzs:
                    raise DataError(f"sav: no *.npz files under {self.root} (layout='npz')")
                signature = file_signature(npzs)
                build = partial(_build_npz, npzs)
        self._attach(cached_index(self.kind, self.root, options, signature, build, INDEX_VERSION))
        m = self.index.meta
        self._check_index(m["units"], m["n_problems"], m["examples"], m["what"])
        self._require_samples(f"{layout} layout: objects present at annotated frames i and i+{self.frame_gap}")

    def _detect_layout(self, looked_for: str) -> tuple[str, list[str] | None]:
        if os.path.isdir(self.frames_dir) and os.path.isdir(self.masks_dir):
            return "jpeg", None
        files = walk(self.root, (".json", ".mp4", ".npz"))
        if any(f.endswith(("_manual.json", "_auto.json")) for f in files):
            # SAM2's training layout: JSONs without their mp4s, frames extracted to frames_dir
            no_videos = not any(f.endswith(".mp4") for f in files)
            return ("frames" if no_videos and os.path.isdir(self.frames_dir) else "video"), files
        if any(f.endswith(".npz") for f in files):
            return "npz", files
        raise DataError(f"sav: none of the expected files under {self.root} (looked for {looked_for})")

    def _jpeg_signature(self) -> list:
        """Every mask PNG (size, mtime) and every listed folder (mtime: frames coming or going)."""
        dirs, pngs = [self.masks_dir, self.frames_dir], []
        for vid in sorted(list_dir(self.masks_dir)):
            vdir = os.path.join(self.masks_dir, vid)
            dirs += [vdir, os.path.join(self.frames_dir, vid)]
            for o in sorted(list_dir(vdir)):
                odir = os.path.join(vdir, o)
                dirs.append(odir)
                pngs += [os.path.join(odir, n) for n in sorted(list_dir(odir)) if n.endswith(".png")]
        return file_signature(dirs) + file_signature(pngs)

    def _bind(self, index) -> dict:
        return {"rows": {name: index[name] for name in index.meta["_columns"]}, "paths": index["path"],
                "second": index["second"]}

    def __len__(self) -> int:
        return len(self.rows["unit"])

    def sample_info(self, index: int) -> dict:
        r = {k: int(v[index]) for k, v in self.rows.items()}
        path = self.paths[r["unit"]]
        if self.layout == "npz":  # pre-extracted: the frame numbers are not known, only that they differ
            return {"path": path, "pair": r["i"], "video": path, "object": 0, "frame1": 0, "frame2": 1}
        video = self.second[r["unit"]] if self.layout in ("video", "frames") else path.split("/")[0]
        return {"path": path, "video": video, "object": r["obj"], "frame1": r["i"] * self.ann_every,
                "frame2": r["j"] * self.ann_every}

    def load(self, index: int) -> dict:
        r = {k: int(v[index]) for k, v in self.rows.items()}
        if self.layout in ("video", "frames"):
            return self._load_video(r)
        if self.layout == "jpeg":
            return self._load_jpeg(r)
        return self._load_npz(r)

    def _load_video(self, r: dict) -> dict:
        json_path, video_path = self.paths[r["unit"]], self.second[r["unit"]]
        masklet = _load_json(json_path).get("masklet")
        try:
            rle1, rle2 = masklet[r["i"]][r["obj"]], masklet[r["j"]][r["obj"]]
        except (TypeError, IndexError, KeyError) as e:
            raise BadSample(json_path, f"masklet has no object {r['obj']} at annotated frames {r['i']}/{r['j']}") \
                from e
        f1, f2 = r["i"] * self.ann_every, r["j"] * self.ann_every
        if self.layout == "frames":  # video_path: the video's folder of extracted frames
            frames = {f: read_image(os.path.join(video_path, f"{f:05d}.jpg")) for f in (f1, f2)}
        else:
            frames = read_video_frames(video_path, [f1, f2])
        h, w = frames[f1].shape[:2]
        mask1 = decode_rle(rle1, h, w, where=json_path)
        mask2 = decode_rle(rle2, h, w, where=json_path)
        tag = "auto" if json_path.endswith("_auto.json") else "manual"
        video = os.path.splitext(os.path.basename(video_path))[0]
        key = f"{video}/{tag}/obj{r['obj']:03d}/f{f1:05d}-f{f2:05d}"
        return make_item(frames[f1], mask1, image2=frames[f2], mask2=mask2, source=self.kind, key=key,
                         where=json_path)

    def _load_jpeg(self, r: dict) -> dict:
        obj_dir = self.paths[r["unit"]]  # "<video>/<obj>"
        video = obj_dir.split("/")[0]
        views = []
        for a in (r["i"], r["j"]):
            frame = a * self.ann_every
            image = read_image(os.path.join(self.frames_dir, video, f"{frame:05d}.jpg"))
            png = os.path.join(self.masks_dir, obj_dir, f"{frame:05d}.png")
            mask = read_png_mask(png, threshold=1)
            if mask.shape != image.shape[:2]:
                raise BadSample(png, f"mask {mask.shape} differs from frame size {image.shape[:2]}")
            views.append((image, mask))
        key = f"{obj_dir}/f{r['i'] * self.ann_every:05d}-f{r['j'] * self.ann_every:05d}"
        return make_item(views[0][0], views[0][1], image2=views[1][0], mask2=views[1][1], source=self.kind, key=key,
                         where=obj_dir)

    def _load_npz(self, r: dict) -> dict:
        path = self.paths[r["unit"]]
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = [z[k] for k in ("frame1", "mask1", "frame2", "mask2")]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise BadSample(path, f"unreadable npz: {e}") from e
        if r["i"] >= 0:
            try:
                arrays = [a[r["i"]] for a in arrays]
            except IndexError as e:
                raise BadSample(path, f"npz has no pair {r['i']}") from e
        f1, m1, f2, m2 = arrays
        for name, a in (("frame1", f1), ("frame2", f2)):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise BadSample(path, f"{name} is {a.dtype} {a.shape}, expected uint8 HxWx3")
        m1, m2 = (np.asarray(m) != 0 for m in (m1, m2))
        rel = os.path.relpath(path, self.root)
        key = rel if r["i"] < 0 else f"{rel}#{r['i']}"
        return make_item(f1, m1.astype(np.uint8), image2=f2, mask2=m2.astype(np.uint8), source=self.kind, key=key,
                         where=path)


def _rows(unit, obj, i, j) -> dict:
    return {"unit": np.asarray(unit, np.int32), "obj": np.asarray(obj, np.int32), "i": np.asarray(i, np.int32),
            "j": np.asarray(j, np.int32)}


def _frame_folders(jsons, suffixes, frames_dir) -> list[str]:
    """The extracted-frame folder of each annotation file: `<frames_dir>/<video>/`."""
    out = []
    for path in jsons:
        suffix = next(s for s in suffixes if path.endswith(s))
        out.append(os.path.join(frames_dir, os.path.basename(path)[: -len(suffix)]))
    return out


def _build_video(jsons, videos, suffixes, ann_every, gap, pairs_per_object, folders=None):
    """Pairs of the video layout; with `folders` (each JSON's extracted-frame folder), of the frames layout (an
    annotated frame counts as present only when its JPEG was extracted)."""
    unit, obj, ii, jj, paths, second, problems = [], [], [], [], [], [], []
    for n, path in enumerate(jsons):
        suffix = next(s for s in suffixes if path.endswith(s))
        extracted = None
        if folders is None:
            video = path[: -len(suffix)] + ".mp4"
            if video not in videos:
                problems.append(f"{path}: video {video} is missing")
                continue
        else:
            video = folders[n]
            extracted = {int(f[:-4]) for f in list_dir(video) if f.endswith(".jpg") and f[:-4].isdigit()}
            if not extracted:
                problems.append(f"{path}: no extracted frames in {video}")
                continue
        try:
            with open(path, "rb") as f:
                masklet = json.load(f)["masklet"]
            n_obj = max((len(fr) for fr in masklet if fr), default=0)
            present = np.zeros((len(masklet), n_obj), dtype=bool)
            for a, frame in enumerate(masklet):
                if extracted is not None and a * ann_every not in extracted:
                    continue
                for o, rle in enumerate(frame or []):
                    present[a, o] = rle_area(rle, path) > 0
        except (OSError, ValueError, KeyError, TypeError, BadSample) as e:
            problems.append(f"{path}: unreadable masklet JSON ({type(e).__name__}: {e})")
            continue
        u = len(paths)
        paths.append(path)
        second.append(video)
        for o in range(n_obj):
            for a in select_anchors(present[:, o], gap, pairs_per_object):
                unit.append(u)
                obj.append(o)
                ii.append(a)
                jj.append(a + gap)
    meta = {"units": len(jsons), "n_problems": len(problems), "examples": problems[:20],
            "what": "annotation files are unreadable or have no video" + (" frames" if folders else "")}
    return dict(_rows(unit, obj, ii, jj), path=paths, second=second), meta


def _build_jpeg(frames_dir, masks_dir, ann_every, gap, pairs_per_object):
    unit, obj, ii, jj, paths, problems = [], [], [], [], [], []
    n_units = 0
    for vid in sorted(list_dir(masks_dir)):
        vdir = os.path.join(masks_dir, vid)
        if not os.path.isdir(vdir):
            continue
        jpgs = set(list_dir(os.path.join(frames_dir, vid)))
        for o_name in sorted(list_dir(vdir)):
            odir = os.path.join(vdir, o_name)
            if not os.path.isdir(odir):
                continue
            n_units += 1
            frames = sorted(int(n[:-4]) for n in list_dir(odir) if n.endswith(".png") and n[:-4].isdigit())
            ann = [f // ann_every for f in frames if f % ann_every == 0]
            n = max(ann, default=-1) + 1
            present = np.zeros(n, dtype=bool)
            try:
                for a in ann:
                    f = a * ann_every
                    if f"{f:05d}.jpg" in jpgs:
                        present[a] = read_png_mask(os.path.join(odir, f"{f:05d}.png"), threshold=1).any()
            except BadSample as e:
                problems.append(str(e))
                continue
            missing = [a * ann_every for a in ann if f"{a * ann_every:05d}.jpg" not in jpgs]
            if missing:
                problems.append(f"{os.path.join(frames_dir, vid)}: frames {missing[:5]} missing")
            try:
                o_int = int(o_name)
            except ValueError:
                o_int = n_units
            u = len(paths)
            paths.append(f"{vid}/{o_name}")
            for a in select_anchors(present, gap, pairs_per_object):
                unit.append(u)
                obj.append(o_int)
                ii.append(a)
                jj.append(a + gap)
    meta = {"units": n_units, "n_problems": len(problems), "examples": problems[:20],
            "what": "objects have unreadable masks or missing frames"}
    return dict(_rows(unit, obj, ii, jj), path=paths, second=[]), meta


def _build_npz(npzs):
    unit, pair, paths, problems = [], [], [], []
    for path in npzs:
        try:
            positions = _npz_pairs(path)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            problems.append(f"{path}: unreadable npz ({type(e).__name__}: {e})")
            continue
        u = len(paths)
        paths.append(path)
        for k in positions:
            unit.append(u)
            pair.append(k)
    meta = {"units": len(npzs), "n_problems": len(problems), "examples": problems[:20],
            "what": "npz files are unreadable"}
    zeros = [0] * len(unit)
    return dict(_rows(unit, zeros, pair, zeros), path=paths, second=[]), meta
