"""SA-1B: `sa_*.jpg` + `sa_*.json` anywhere under root; one sample per annotation with area > 0."""
from __future__ import annotations

import json
import os
from array import array
from functools import lru_cache

import numpy as np

from .base import DataError, Reader, check_root, make_item, walk
from .index import cached_index, file_signature
from .masks import BadSample, decode_rle, read_image, rle_area

INDEX_VERSION = 1


@lru_cache(maxsize=4)
def _load_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadSample(path, f"unreadable annotation JSON: {e}") from e


class SA1BDataset(Reader):
    kind = "sa1b"

    def __init__(self, root, *, max_files: int | None = None, min_predicted_iou: float | None = None,
                 min_area_frac: float | None = None, max_bad_fraction: float = 0.01, seed: int = 0):
        super().__init__(root, max_bad_fraction=max_bad_fraction, seed=seed)
        looked_for = "sa_*.json annotation files next to sa_*.jpg images"
        check_root(self.kind, self.root, looked_for)
        if max_files is not None and int(max_files) < 1:
            raise ValueError(f"sa1b: max_files must be ≥ 1 or None, got {max_files!r}")
        files = walk(self.root, (".json", ".jpg"))
        jsons = [p for p in files if os.path.basename(p).startswith("sa_") and p.endswith(".json")]
        if not jsons:
            raise DataError(f"sa1b: no sa_*.json files under {self.root} (looked for {looked_for})")
        if max_files is not None:
            jsons = jsons[: int(max_files)]
        images = {p for p in files if p.endswith(".jpg")}
        options = {"max_files": max_files, "min_predicted_iou": min_predicted_iou, "min_area_frac": min_area_frac}
        dirs = sorted({os.path.dirname(p) for p in jsons})
        signature = file_signature(jsons) + file_signature(dirs)

        def build():
            return _build(jsons, images, min_predicted_iou, min_area_frac)

        self._attach(cached_index(self.kind, self.root, options, signature, build, INDEX_VERSION))
        m = self.index.meta
        self._check_index(m["files"], m["n_problem_files"], m["examples"], "annotation files are unreadable or "
                          "have no image")
        self._require_samples(looked_for + " with annotations of area > 0 passing the filters")

    def _bind(self, index) -> dict:
        return {"file": index["file"], "ann_pos": index["ann_pos"], "ann_id": index["ann_id"],
                "json_paths": index["json_path"], "image_paths": index["image_path"]}

    def __len__(self) -> int:
        return len(self.file)

    def sample_info(self, index: int) -> dict:
        f = int(self.file[index])
        return {"json": self.json_paths[f], "image": self.image_paths[f], "annotation_index": int(self.ann_pos[index]),
                "annotation_id": int(self.ann_id[index])}

    def load(self, index: int) -> dict:
        f = int(self.file[index])
        json_path = self.json_paths[f]
        record = _load_json(json_path)
        try:
            ann = record["annotations"][int(self.ann_pos[index])]
            seg = ann["segmentation"]
        except (KeyError, IndexError, TypeError) as e:
            raise BadSample(json_path, f"annotation {int(self.ann_pos[index])} missing or malformed: {e}") from e
        image = read_image(self.image_paths[f])
        mask = decode_rle(seg, image.shape[0], image.shape[1], where=json_path)
        stem = os.path.splitext(os.path.basename(json_path))[0]
        return make_item(image, mask, source=self.kind, key=f"{stem}/{int(self.ann_id[index])}", where=json_path)


def _build(jsons, images, min_predicted_iou, min_area_frac):
    # typed arrays, not lists: the full SA-1B has ~1.1 B masks, and a list holds a 36-byte int object per entry
    file_col, pos_col, id_col = array("i"), array("i"), array("q")
    json_paths, image_paths, problems = [], [], []
    for path in jsons:
        image_path = path[: -len(".json")] + ".jpg"
        try:
            with open(path, "rb") as f:
                record = json.load(f)
            anns = record["annotations"]
            info = record.get("image", {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{path}: unreadable annotation JSON ({type(e).__name__}: {e})")
            continue
        if image_path not in images:
            alt = os.path.join(os.path.dirname(path), str(info.get("file_name", "")))
            if alt in images:
                image_path = alt
            else:
                problems.append(f"{path}: image {image_path} is missing")
                continue
        h, w = int(info.get("height", 0) or 0), int(info.get("width", 0) or 0)
        f_idx = len(json_paths)
        json_paths.append(path)
        image_paths.append(image_path)
        for k, ann in enumerate(anns):
            seg = ann.get("segmentation")
            area = ann.get("area")
            if area is None:
                try:
                    area = rle_area(seg, path)
                except BadSample:
                    area = 0
            if not area or area <= 0:
                continue
            if min_predicted_iou is not None and float(ann.get("predicted_iou", 1.0)) < float(min_predicted_iou):
                continue
            if min_area_frac is not None and h * w > 0 and float(area) / (h * w) < float(min_area_frac):
                continue
            file_col.append(f_idx)
            pos_col.append(k)
            id_col.append(int(ann.get("id", k)))
    columns = {"file": np.frombuffer(file_col, np.int32), "ann_pos": np.frombuffer(pos_col, np.int32),
               "ann_id": np.frombuffer(id_col, np.int64), "json_path": json_paths, "image_path": image_paths}
    meta = {"files": len(jsons), "n_problem_files": len(problems), "examples": problems[:20]}
    return columns, meta
