"""Readers on small files laid out as the REAL published datasets are (not as dualloop.data.synthetic writes them).

Each test names the source of the layout it copies; each guards a mismatch the synthetic corpus did not show.
"""
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from dualloop.data import open_dataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools+numpy2


def _column_major_runs(m: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (as in COCO iscrowd annotations): runs over the column-major pixels, 0s first."""
    flat = m.flatten(order="F")
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    return runs


# ---------------------------------------------------------------------------------------------------- OpenImages
@pytest.mark.parametrize("descriptions", ["oidv7-class-descriptions-boxable.csv", "oidv6-class-descriptions.csv",
                                          "oidv6-class-descriptions-boxable.csv"])
def test_openimages_reads_published_class_description_files(tmp_path, descriptions):
    """Open Images publishes its class names (header LabelName,DisplayName since v6) as e.g.
    `oidv7-class-descriptions-boxable.csv` (storage.googleapis.com/openimages/v7/; the boxable classes include every
    segmented one) or `oidv6-class-descriptions.csv`. With only such a file next to the CSV, every OpenImages sample
    silently lost its caption."""
    image_id, mask_name = "677c122b0eaa5d16", "677c122b0eaa5d16_m04yx4_9a041d52.png"  # MaskPath as published
    (tmp_path / "train").mkdir()
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp_path / "train" / f"{image_id}.jpg")
    masks = tmp_path / "train-masks" / "train-masks-6"  # unzipped train-masks-6.zip (first char of the ImageID)
    masks.mkdir(parents=True)
    small = np.zeros((24, 32), np.uint8)
    small[6:18, 8:24] = 255
    Image.fromarray(small).save(masks / mask_name)  # mask stored smaller than the image
    (tmp_path / "train-annotations-object-segmentation.csv").write_text(
        "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n"
        f"{mask_name},{image_id},/m/04yx4,9a041d52,0.25,0.75,0.25,0.75,0.86864,0.5 0.5 1;0.3 0.4 0\n")
    (tmp_path / descriptions).write_text("LabelName,DisplayName\n/m/04yx4,Man\n")

    ds = open_dataset("openimages", tmp_path, split="train")
    item = ds[0]
    assert item["captions"] == ["Man"]
    truth = np.zeros((48, 64), np.uint8)
    truth[12:36, 16:48] = 1  # the mask resized (nearest) to the image
    np.testing.assert_array_equal(item["mask1"].numpy(), truth)


# ---------------------------------------------------------------------------------------------------- RefCOCO
def test_refcoco_in_the_refer_layout(tmp_path):
    """lichengunc/refer (refer.py): `<data>/<dataset>/instances.json` + `refs(unc).p`, images in
    `<data>/images/mscoco/images/train2014/`, named by instances.json `file_name` (the refs' own `file_name` carries an
    `_<ann_id>` suffix and names no file). Crowd annotations are RLE with list counts. Pointing root at refer's data
    folder found no image at all."""
    image_id, h, w = 581857, 40, 50
    file_name = f"COCO_train2014_{image_id:012d}.jpg"
    image_dir = tmp_path / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True)
    Image.fromarray(np.full((h, w), 128, np.uint8), mode="L").save(image_dir / file_name)  # COCO has grayscale JPEGs

    crowd = np.zeros((h, w), np.uint8)
    crowd[20:35, 5:30] = 1
    polygon = [[10.0, 5.0, 40.0, 5.0, 40.0, 15.0, 10.0, 15.0]]
    annotations = [
        {"id": 16, "image_id": image_id, "category_id": 1, "iscrowd": 0, "segmentation": polygon,
         "area": 300.0, "bbox": [10.0, 5.0, 30.0, 10.0]},
        {"id": 17, "image_id": image_id, "category_id": 1, "iscrowd": 1,
         "segmentation": {"counts": _column_major_runs(crowd), "size": [h, w]},
         "area": float(crowd.sum()), "bbox": [5.0, 20.0, 25.0, 15.0]},
    ]
    data = tmp_path / "refcoco"
    data.mkdir()
    with open(data / "instances.json", "w") as f:
        json.dump({"images": [{"id": image_id, "file_name": file_name, "height": h, "width": w}],
                   "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}, f)
    refs = []
    for ref_id, ann_id, text in ((0, 16, "man on top"), (1, 17, "crowd below")):
        refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": "train", "category_id": 1,
                     "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sent_ids": [ref_id],
                     "sentences": [{"tokens": text.split(), "raw": text, "sent_id": ref_id, "sent": text}]})
    with open(data / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)

    ds = open_dataset("refcoco", tmp_path, split="train")  # no image_root: refer's layout must be found
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["captions"] == ["man on top"] and second["captions"] == ["crowd below"]
    assert tuple(first["image1"].shape) == (3, h, w)
    poly_truth = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, h, w)))
    np.testing.assert_array_equal(first["mask1"].numpy(), poly_truth)
    np.testing.assert_array_equal(second["mask1"].numpy(), crowd)
