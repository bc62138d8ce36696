"""OpenImages v7 segmentation: one sample per row of `<split>-annotations-object-segmentation.csv`.

Mask PNGs lie in `<root>/<split>-masks/`, flat or in the sixteen folders of the unzipped
`<split>-masks-[0-9a-f].zip` (named `<split>-masks-<c>` or `<c>`), or in those sixteen folders unzipped beside it,
`<root>/<split>-masks-<c>/` (with the default `mask_dir` only). Where both are present every one of them is searched
(a partly moved download works); a PNG found in several is read from `<split>-masks/` (itself, then its subfolders)
before the folders beside it. Images in `<root>/<split>/<ImageID>.jpg` (the CVDF `aws s3 sync` layout) or in the
sixteen folders `<root>/<split>_[0-9a-f]/` that CVDF's packed `<split>_<c>.tar.gz` files unpack to. Existence is
checked against one listing per folder, never one stat per row.
"""
from __future__ import annotations

import csv
import logging
import os

import numpy as np

from .base import DataError, Reader, check_root, list_dir, make_item
from .index import cached_index, file_signature
from .masks import read_image, read_png_mask

INDEX_VERSION = 3  # 3: meta['folders'] are the mask folders' absolute paths
log = logging.getLogger("dualloop.data")
HEX = "0123456789abcdef"
# Class-name files under their published names, looked up in this order in the dataset root: all classes (v7, v6),
# the boxable subset that covers every segmented class (v7, v6), and the header-less v5 files.
DESCRIPTION_FILES = ("oidv7-class-descriptions.csv", "oidv6-class-descriptions.csv",
                     "oidv7-class-descriptions-boxable.csv", "oidv6-class-descriptions-boxable.csv",
                     "class-descriptions-boxable.csv", "class-descriptions.csv")


def _mask_folders(mask_dir: str, split: str, beside: str | None = None) -> list[tuple[str, str]]:
    """(path, first character or "") of every folder that may hold mask PNGs: `mask_dir` itself ("") if it exists,
    its hex subfolders (`<split>-masks-<c>` or `<c>`), then, with `beside` (the dataset root), the hex folders
    `<beside>/<split>-masks-<c>` that unzipping each zip into its own folder next to `mask_dir` leaves."""
    folders = [(mask_dir, "")] if os.path.isdir(mask_dir) else []
    for name in sorted(list_dir(mask_dir)):
        if name.endswith(".png"):
            continue
        c = name[-1:].lower()
        if c in HEX and name.lower() in (c, f"{split}-masks-{c}") and os.path.isdir(os.path.join(mask_dir, name)):
            folders.append((os.path.join(mask_dir, name), c))
    if beside is not None:
        for c in HEX:
            d = os.path.join(beside, f"{split}-masks-{c}")
            if os.path.isdir(d):
                folders.append((d, c))
    return folders


def _image_folders(root: str, split: str, image_dir: str | None) -> list[str]:
    """Folders that may hold `<ImageID>.jpg`: the flat `<split>/` folder and CVDF's per-first-character
    `<split>_<c>/` folders (cvdfoundation/open-images-dataset: `train_0.tar.gz` ... `train_f.tar.gz`), next to it or
    inside it. An explicit `image_dir` is searched the same way (itself, then its `<split>_<c>` subfolders)."""
    flat = image_dir or os.path.join(root, split)
    parents = [flat] if image_dir else [root, flat]
    subs = [os.path.join(parent, f"{split}_{c}") for parent in parents for c in HEX]
    return [d for d in [flat] + subs if os.path.isdir(d)]


def read_class_descriptions(path: str) -> dict[str, str]:
    """LabelName → DisplayName, from a CSV with header `LabelName,DisplayName` or without a header."""
    out = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.reader(f)):
            if len(row) < 2 or (i == 0 and row[0] == "LabelName"):
                continue
            out[row[0]] = row[1]
    return out


class OpenImagesDataset(Reader):
    kind = "openimages"

    def __init__(self, root, *, split: str = "train", annotations: str | None = None, mask_dir: str | None = None,
                 image_dir: str | None = None, class_descriptions: str | None = None,
                 max_bad_fraction: float = 0.01, seed: int = 0):
        super().__init__(root, max_bad_fraction=max_bad_fraction, seed=seed)
        csv_path = annotations or os.path.join(self.root, f"{split}-annotations-object-segmentation.csv")
        check_root(self.kind, self.root, csv_path)
        if not os.path.isfile(csv_path):
            raise DataError(f"openimages: annotation CSV {csv_path} not found (split={split!r})")
        self.mask_dir = mask_dir or os.path.join(self.root, f"{split}-masks")
        self.image_dir = image_dir or os.path.join(self.root, split)
        beside = None if mask_dir else str(self.root)  # the zips unzipped beside it: <root>/<split>-masks-<c>/
        mask_folders = _mask_folders(self.mask_dir, split, beside)
        if not mask_folders:
            raise DataError(f"openimages: mask folder {self.mask_dir} does not exist" + (
                "" if mask_dir else f" (nor the {split}-masks-[0-9a-f] folders of the unzipped "
                                    f"{split}-masks-<c>.zip files beside it in {self.root})"))
        image_folders = _image_folders(str(self.root), split, image_dir)
        if not image_folders:
            raise DataError(f"openimages: image folder {self.image_dir} does not exist (nor the {split}_[0-9a-f] "
                            f"folders of CVDF's {split}_<c>.tar.gz files)")
        if class_descriptions is None:
            found = [p for p in (os.path.join(self.root, n) for n in DESCRIPTION_FILES) if os.path.isfile(p)]
            class_descriptions = found[0] if found else None
            if class_descriptions is None:  # not an error, but every sample goes without a caption
                log.warning("openimages: none of %s in %s; samples will have no captions", DESCRIPTION_FILES, self.root)
        # the mask folders found (one appearing or going changes this list) and their mtimes (PNGs coming or going)
        listed = [self.mask_dir] + [d for d, _ in mask_folders if d != self.mask_dir] + image_folders
        signature = file_signature([csv_path] + ([class_descriptions] if class_descriptions else [])) + \
            file_signature(listed)
        options = {"split": split, "annotations": csv_path, "mask_dir": self.mask_dir, "image_dir": self.image_dir,
                   "class_descriptions": class_descriptions, "masks_beside": beside is not None}

        def build():
            return _build(csv_path, mask_folders, image_folders, class_descriptions)

        self._attach(cached_index(self.kind, self.root, options, signature, build, INDEX_VERSION))
        m = self.index.meta
        self._check_index(m["rows"], m["missing"], m["examples"], "CSV rows reference a missing image or mask file")
        self._require_samples(f"rows of {csv_path} whose image and mask files exist")

    def _bind(self, index) -> dict:
        return {"mask_names": index["mask"], "folder": index["folder"], "image": index["image"],
                "label": index["label"], "image_ids": index["image_id"], "captions_of_label": index["caption"],
                "label_names": index["label_name"], "folders": index.meta["folders"],
                "image_folder": index["image_folder"], "image_folders": index.meta["image_folders"]}

    def __len__(self) -> int:
        return len(self.mask_names)

    def _paths(self, index: int) -> tuple[str, str]:
        mask = os.path.join(self.folders[int(self.folder[index])], self.mask_names[index])
        img = int(self.image[index])
        image = os.path.join(self.image_folders[int(self.image_folder[img])], self.image_ids[img] + ".jpg")
        return image, mask

    def sample_info(self, index: int) -> dict:
        image, mask = self._paths(index)
        return {"image": image, "mask": mask, "label": self.label_names[int(self.label[index])]}

    def load(self, index: int) -> dict:
        image_path, mask_path = self._paths(index)
        image = read_image(image_path)
        mask = read_png_mask(mask_path, threshold=128, size=image.shape[:2])
        caption = self.captions_of_label[int(self.label[index])]
        key = os.path.splitext(self.mask_names[index])[0]
        return make_item(image, mask, source=self.kind, key=key, captions=[caption] if caption else [],
                         where=mask_path)


def _build(csv_path, mask_folders, image_folders, class_descriptions):
    """`mask_folders`: [(path, first character or "")] in order of precedence (see _mask_folders)."""
    names = [set(n for n in list_dir(d) if n.endswith(".png")) for d, _ in mask_folders]
    by_char = {}  # first character → the first folder of that character
    for i, (_, c) in enumerate(mask_folders):
        if c:
            by_char.setdefault(c, i)
    images: dict[str, int] = {}  # ImageID → position in image_folders (the first folder holding it)
    for k, d in enumerate(image_folders):
        for n in list_dir(d):
            if n.endswith(".jpg"):
                images.setdefault(n[:-4], k)
    descriptions = read_class_descriptions(class_descriptions) if class_descriptions else {}

    mask_col, folder_col, image_col, label_col = [], [], [], []
    image_index: dict[str, int] = {}
    label_index: dict[str, int] = {}
    rows = missing = 0
    examples = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # tolerate a BOM
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"openimages: {csv_path} is empty") from None
        try:
            c_mask, c_image, c_label = (header.index(c) for c in ("MaskPath", "ImageID", "LabelName"))
        except ValueError:
            raise DataError(f"openimages: {csv_path} lacks a MaskPath/ImageID/LabelName header "
                            f"(got {header[:10]})") from None
        for row in reader:
            if not row:
                continue
            rows += 1
            try:
                mask_name, image_id, label = row[c_mask], row[c_image], row[c_label]
            except IndexError:
                missing += 1
                if len(examples) < 20:
                    examples.append(f"{csv_path}: malformed row {rows}: {row}")
                continue
            fi = 0  # mask_dir itself first (when it exists), then the folder of the name's first character
            if mask_name not in names[fi]:
                fi = by_char.get(mask_name[:1].lower(), 0)
            if mask_name not in names[fi]:
                fi = next((i for i, s in enumerate(names) if mask_name in s), -1)
            if fi < 0 or image_id not in images:
                missing += 1
                if len(examples) < 20:
                    what = f"mask {mask_name}" if fi < 0 else f"image {image_id}.jpg"
                    examples.append(f"{what} missing (row {rows} of {csv_path})")
                continue
            mask_col.append(mask_name)
            folder_col.append(fi)
            ii = image_index.setdefault(image_id, len(image_index))
            image_col.append(ii)
            label_col.append(label_index.setdefault(label, len(label_index)))
    labels = list(label_index)
    columns = {
        "mask": mask_col,
        "image_folder": np.asarray([images[i] for i in image_index], np.uint8),
        "folder": np.asarray(folder_col, np.uint8),
        "image": np.asarray(image_col, np.int32),
        "label": np.asarray(label_col, np.int32),
        "image_id": list(image_index),
        "label_name": labels,
        "caption": [descriptions.get(lab, "") for lab in labels],
    }
    meta = {"rows": rows, "missing": missing, "examples": examples,
            "folders": [os.path.abspath(d) for d, _ in mask_folders],
            "image_folders": [os.path.abspath(d) for d in image_folders]}
    return columns, meta
