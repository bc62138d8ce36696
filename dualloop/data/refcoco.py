"""RefCOCO / RefCOCO+ / RefCOCOg: `<root>/<dataset>/instances.json` + `refs(<split_by>).p`, COCO train2014 images
(default: `<root>/images/mscoco/images/train2014/` as refer lays them out, else `<root>/images/`; a COCO 2017
`train2017/` folder, whose files drop the `COCO_train2014_` prefix, works as image_root too).

The index keeps, per referred annotation, its segmentation as a JSON string (polygons or RLE) and its image's size,
so workers never hold the whole instances.json.
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np

from .base import DataError, Reader, check_root, list_dir, make_item
from .index import cached_index, file_signature
from .masks import BadSample, decode_segmentation, read_image

INDEX_VERSION = 3  # 3: meta lists the splits of refs(*).p
UNITS = ("ref", "sentence")


def _file_on_disk(file_name: str, present: set[str]) -> str | None:
    """instances.json's `COCO_train2014_<id:012d>.jpg`, or the same image under its COCO 2017 name `<id:012d>.jpg`
    (train2017 holds every train2014 image under the bare id), whichever the image folder has."""
    if file_name in present:
        return file_name
    bare = file_name.rsplit("_", 1)[-1]
    return bare if bare != file_name and bare in present else None


def _sentence_text(s) -> str:
    if isinstance(s, dict):
        return str(s.get("sent") or s.get("raw") or "")
    return str(s)


class RefCOCODataset(Reader):
    kind = "refcoco"

    def __init__(self, root, *, dataset: str = "refcoco", split_by: str = "unc", split: str | None = "train",
                 unit: str = "ref", image_root: str | None = None, max_bad_fraction: float = 0.01, seed: int = 0):
        super().__init__(root, max_bad_fraction=max_bad_fraction, seed=seed)
        if unit not in UNITS:
            raise ValueError(f"refcoco: unit must be one of {UNITS}, got {unit!r}")
        folder = os.path.join(self.root, dataset)
        inst_path = os.path.join(folder, "instances.json")
        refs_path = os.path.join(folder, f"refs({split_by}).p")
        check_root(self.kind, self.root, f"{inst_path} and {refs_path}")
        for p in (inst_path, refs_path):
            if not os.path.isfile(p):
                hint = " (RefCOCOg uses split_by='umd')" if p == refs_path and dataset == "refcocog" else ""
                raise DataError(f"refcoco: {p} not found{hint}")
        if not image_root:
            # refer's own layout (refer.py: <data>/images/mscoco/images/train2014) first, then a flat <root>/images
            candidates = [os.path.join(self.root, "images", "mscoco", "images", "train2014"),
                          os.path.join(self.root, "images")]
            image_root = next((c for c in candidates if os.path.isdir(c)), candidates[-1])
        self.image_root = image_root
        if not os.path.isdir(self.image_root):
            raise DataError(f"refcoco: image_root {self.image_root} does not exist")
        self.name = f"{dataset}/{split_by}"
        options = {"dataset": dataset, "split_by": split_by, "split": split, "unit": unit,
                   "image_root": os.path.abspath(self.image_root)}
        signature = file_signature([inst_path, refs_path, self.image_root])

        def build():
            return _build(inst_path, refs_path, self.image_root, split, unit)

        self._attach(cached_index(self.kind, self.root, options, signature, build, INDEX_VERSION))
        self.split = split
        m = self.index.meta
        self._check_index(m["refs"], m["missing"], m["examples"], "refs have a missing image or annotation")
        if m["refs"] == 0 and split not in (None, "all"):  # a split name of another dataset (RefCOCOg has no testA)
            raise DataError(f"refcoco: {refs_path} has no split {split!r}; its splits: {', '.join(m['splits'])}")
        self._require_samples(f"refs of split {split!r} in {refs_path}")

    def _bind(self, ix) -> dict:
        return {"ann": ix["ann"], "ref_id": ix["ref_id"], "sent_id": ix["sent_id"], "sent_start": ix["sent_start"],
                "sent_count": ix["sent_count"], "sentences": ix["sentence"], "segmentation": ix["segmentation"],
                "ann_image": ix["ann_image"], "image_h": ix["h"], "image_w": ix["w"], "file_names": ix["file"]}

    def __len__(self) -> int:
        return len(self.ann)

    def sample_info(self, index: int) -> dict:
        a = int(self.ann[index])
        img = int(self.ann_image[a])
        return {"image": os.path.join(self.image_root, self.file_names[img]), "ref_id": int(self.ref_id[index]),
                "sent_id": int(self.sent_id[index])}

    def load(self, index: int) -> dict:
        a = int(self.ann[index])
        img = int(self.ann_image[a])
        image_path = os.path.join(self.image_root, self.file_names[img])
        image = read_image(image_path)
        h, w = int(self.image_h[img]), int(self.image_w[img])
        if image.shape[:2] != (h, w):
            raise BadSample(image_path, f"image is {image.shape[0]}x{image.shape[1]}, instances.json says {h}x{w}")
        mask = decode_segmentation(json.loads(self.segmentation[a]), h, w, where=f"{image_path} (ann {a})")
        s0, k = int(self.sent_start[index]), int(self.sent_count[index])
        captions = [self.sentences[j] for j in range(s0, s0 + k)]
        key = f"{self.name}/ref{int(self.ref_id[index])}"
        if int(self.sent_id[index]) >= 0:
            key += f"/sent{int(self.sent_id[index])}"
        return make_item(image, mask, source=self.kind, key=key, captions=captions, where=image_path)


def _build(inst_path, refs_path, image_root, split, unit):
    try:
        with open(inst_path, "rb") as f:
            inst = json.load(f)
        with open(refs_path, "rb") as f:
            refs = pickle.load(f, encoding="latin1")  # the original refs(*).p files are Python 2 pickles
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"refcoco: cannot read {inst_path} / {refs_path}: {e}") from e
    images = {int(im["id"]): im for im in inst.get("images", [])}
    anns = {int(a["id"]): a for a in inst.get("annotations", [])}
    present = set(list_dir(image_root))

    ann_slot: dict[int, int] = {}
    img_slot: dict[int, int] = {}
    seg_col, ann_image, files, hs, ws = [], [], [], [], []
    ann_col, ref_col, sent_id_col, start_col, count_col, sentences = [], [], [], [], [], []
    n_refs = missing = 0
    examples = []
    for ref in refs:
        if split not in (None, "all") and ref.get("split") != split:
            continue
        n_refs += 1
        ann = anns.get(int(ref["ann_id"]))
        im = images.get(int(ref["image_id"]))
        on_disk = _file_on_disk(str(im.get("file_name")), present) if im is not None else None
        if ann is None or im is None or on_disk is None:
            missing += 1
            if len(examples) < 20:
                what = (f"annotation {ref['ann_id']}" if ann is None else f"image {ref['image_id']}" if im is None
                        else f"image file {os.path.join(image_root, im.get('file_name', '?'))}")
                examples.append(f"ref {ref.get('ref_id')}: {what} missing")
            continue
        if int(im["id"]) not in img_slot:
            img_slot[int(im["id"])] = len(files)
            files.append(on_disk)
            hs.append(int(im["height"]))
            ws.append(int(im["width"]))
        if int(ann["id"]) not in ann_slot:
            ann_slot[int(ann["id"])] = len(seg_col)
            seg_col.append(json.dumps(ann["segmentation"], separators=(",", ":")))
            ann_image.append(img_slot[int(im["id"])])
        sents = ref.get("sentences", [])
        per_unit = [sents] if unit == "ref" else [[s] for s in sents]
        for group in per_unit:
            ann_col.append(ann_slot[int(ann["id"])])
            ref_col.append(int(ref["ref_id"]))
            sent_id_col.append(int(group[0].get("sent_id", -1)) if unit == "sentence" and isinstance(group[0], dict)
                               else (len(sentences) if unit == "sentence" else -1))
            start_col.append(len(sentences))
            count_col.append(len(group))
            sentences.extend(_sentence_text(s) for s in group)
    columns = {
        "ann": np.asarray(ann_col, np.int32), "ref_id": np.asarray(ref_col, np.int64),
        "sent_id": np.asarray(sent_id_col, np.int64), "sent_start": np.asarray(start_col, np.int64),
        "sent_count": np.asarray(count_col, np.int32), "sentence": sentences, "segmentation": seg_col,
        "ann_image": np.asarray(ann_image, np.int32), "h": np.asarray(hs, np.int32), "w": np.asarray(ws, np.int32),
        "file": files,
    }
    splits = sorted({str(ref.get("split")) for ref in refs})
    meta = {"refs": n_refs, "missing": missing, "examples": examples, "splits": splits}
    return columns, meta
