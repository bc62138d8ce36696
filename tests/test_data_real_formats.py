"""Readers on small files laid out as the REAL published datasets are (not as dualloop.data.synthetic writes them).

Each test names the source of the layout it copies; each guards a mismatch the synthetic corpus did not show.
"""
import json
import pickle

import av
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


# ---------------------------------------------------------------------------------------------------- SA-V
def _rotated_sav_video(path, degrees: int, h: int, w: int, n: int) -> None:
    """An mp4 stored h x w whose display matrix says: rotate `degrees` counter-clockwise (what the mp4 muxer writes
    into `tkhd`, as phones do); frame k: a red block top-left, green bottom-right, blue level 30k elsewhere."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=24)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": "2", "crf": "0"} if s.codec_context.name == "libx264" else {}  # keyframes: seeks happen
        if degrees:
            s.set_display_rotation(degrees)
        for k in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 2] = 30 * k
            a[: h // 2, : w // 4] = (255, 0, 0)
            a[h // 2:, w // 2:] = (0, 255, 0)
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_sav_mp4_with_rotation_metadata_decodes_as_cv2_does(tmp_path, degrees):
    """SAM2 pairs SA-V's masklets with frames extracted by OpenCV (sam2 `training/scripts/
    sav_frame_extraction_submitit.py`: cv2.VideoCapture, which applies the mp4's display matrix by default,
    CAP_PROP_ORIENTATION_AUTO), and the annotations' video_height/width are the displayed frames'. PyAV returns frames
    as stored: a 90°/270° video failed the RLE size check, a 180° one paired every mask with an upside-down frame."""
    cv2 = pytest.importorskip("cv2")
    h, w, n = 32, 48, 6
    video = tmp_path / "sav_000001.mp4"
    _rotated_sav_video(video, degrees, h, w, n)
    cap = cv2.VideoCapture(str(video))
    shown = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        shown.append(np.ascontiguousarray(bgr[..., ::-1]))
    cap.release()
    assert len(shown) == n
    dh, dw = shown[0].shape[:2]
    assert (dh, dw) == ((w, h) if degrees in (90, 270) else (h, w))
    if degrees == 0:  # the unrotated video: what cv2 shows is what the file stores
        with av.open(str(video)) as c:
            stored = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert all(np.abs(a.astype(int) - b).mean() < 2 for a, b in zip(stored, shown))
    masks = [(f[..., 0] > 128) & (f[..., 1] < 128) for f in shown]  # the red block, where cv2 shows it
    masklet = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        masklet.append([{"size": rle["size"], "counts": rle["counts"].decode()}])
    (tmp_path / "sav_000001_manual.json").write_text(json.dumps({
        "video_id": "sav_000001", "video_height": dh, "video_width": dw, "masklet": masklet, "masklet_id": [0],
        "masklet_first_appeared_frame": [0], "masklet_num": 1, "masklet_type": ["manual"]}))

    ds = open_dataset("sav", tmp_path, ann_every=1, frame_gap=3, pairs_per_object=None)
    assert ds.layout == "video" and len(ds) == n - 3
    for idx in range(len(ds)):
        item = ds[idx]  # the RLEs' size (displayed h x w) must match the decoded frames
        info = ds.sample_info(idx)
        for image, mask, f in (("image1", "mask1", info["frame1"]), ("image2", "mask2", info["frame2"])):
            got = item[image].permute(1, 2, 0).numpy()
            assert got.shape == shown[f].shape
            assert np.abs(got.astype(int) - shown[f]).mean() < 2, (degrees, f)  # up to codec/colour-conversion error
            np.testing.assert_array_equal(item[mask].numpy(), masks[f])


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


def test_openimages_images_in_cvdf_packed_folders(tmp_path):
    """cvdfoundation/open-images-dataset README: the train images also come packed as `train_0.tar.gz` ...
    `train_f.tar.gz` ("the subset train_x contains all images with ID starting with x"), which unpack to folders
    `train_<c>/`. With only those folders there was no `train/` and the reader refused the dataset."""
    rows = []
    masks = tmp_path / "train-masks"
    masks.mkdir()
    for image_id in ("0a1b2c3d4e5f6071", "f0e1d2c3b4a59687"):
        folder = tmp_path / f"train_{image_id[0]}"  # as `tar xzf train_<c>.tar.gz` leaves it
        folder.mkdir()
        Image.fromarray(np.full((32, 40, 3), 200, np.uint8)).save(folder / f"{image_id}.jpg")
        mask = np.zeros((32, 40), np.uint8)
        mask[4:20, 8:30] = 255
        name = f"{image_id}_m01g317_1a2b3c4d.png"
        Image.fromarray(mask).save(masks / name)
        rows.append(f"{name},{image_id},/m/01g317,1a2b3c4d,0.2,0.75,0.125,0.625,0.9,\n")
    (tmp_path / "train-annotations-object-segmentation.csv").write_text(
        "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n" + "".join(rows))
    (tmp_path / "oidv7-class-descriptions.csv").write_text("LabelName,DisplayName\n/m/01g317,Person\n")

    ds = open_dataset("openimages", tmp_path, split="train")
    assert len(ds) == 2
    for i in range(2):
        item = ds[i]
        assert ds.sample_info(i)["image"].startswith(str(tmp_path / f"train_{item['key'][0]}"))
        assert item["captions"] == ["Person"] and int(item["mask1"].sum()) == 16 * 22


def _openimages_rows(tmp_path, placements: dict[str, str], split="train"):
    """One image + CSV row per ImageID; its mask PNG (a 10x12 block) saved in the folder `placements` names."""
    (tmp_path / split).mkdir()
    rows = []
    for image_id, folder in placements.items():
        Image.fromarray(np.full((24, 32, 3), 120, np.uint8)).save(tmp_path / split / f"{image_id}.jpg")
        mask = np.zeros((24, 32), np.uint8)
        mask[2:12, 4:16] = 255
        name = f"{image_id}_m01g317_1a2b3c4d.png"
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(tmp_path / folder / name)
        rows.append(f"{name},{image_id},/m/01g317,1a2b3c4d,0.125,0.5,0.083,0.5,0.9,\n")
    (tmp_path / f"{split}-annotations-object-segmentation.csv").write_text(
        "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n" + "".join(rows))
    (tmp_path / "oidv7-class-descriptions.csv").write_text("LabelName,DisplayName\n/m/01g317,Person\n")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_openimages_mask_zips_unzipped_beside_the_masks_folder(tmp_path, split):
    """storage.googleapis.com/openimages/v5/: the masks come as 16 zips `train-masks-0.zip` ... `train-masks-f.zip`
    (`validation-masks-<c>.zip`), one per first character of the ImageID. Unzipping each into its own folder next to
    the others (`unzip train-masks-0.zip -d train-masks-0`, a file manager's "extract here") leaves
    `<root>/train-masks-<c>/` and no `train-masks/`: the reader refused the dataset (mask folder not found)."""
    ids = ("0a1b2c3d4e5f6071", "5b6c7d8e9fa0b1c2", "f0e1d2c3b4a59687")
    late = "9c8b7a6f5e4d3c2b"  # its zip not unzipped yet: its mask waits in a folder the reader does not search
    _openimages_rows(tmp_path, {**{i: f"{split}-masks-{i[0]}" for i in ids}, late: "not-yet"}, split)
    assert not (tmp_path / f"{split}-masks").exists()
    ds = open_dataset("openimages", tmp_path, split=split, max_bad_fraction=0.5)
    assert len(ds) == 3
    for i, image_id in enumerate(ids):
        info = ds.sample_info(i)
        assert info["mask"] == str(tmp_path / f"{split}-masks-{image_id[0]}" / f"{image_id}_m01g317_1a2b3c4d.png")
        item = ds[i]
        assert item["captions"] == ["Person"] and int(item["mask1"].sum()) == 10 * 12
    (tmp_path / "not-yet").rename(tmp_path / f"{split}-masks-9")  # now unzipped: the cached index is rebuilt
    ds = open_dataset("openimages", tmp_path, split=split)
    assert len(ds) == 4 and ds.sample_info(3)["mask"].startswith(str(tmp_path / f"{split}-masks-9"))


def test_openimages_masks_both_inside_and_beside_the_masks_folder(tmp_path):
    """A download half moved into `train-masks/` (flat and as `train-masks/train-masks-<c>/`) and half left beside it
    as `train-masks-<c>/`: every folder is searched; a PNG present in both places is read from `train-masks/`."""
    ids = {"0a1b2c3d4e5f6071": "train-masks", "1b2c3d4e5f607182": "train-masks/train-masks-1",
           "5b6c7d8e9fa0b1c2": "train-masks-5", "f0e1d2c3b4a59687": "train-masks-f"}
    _openimages_rows(tmp_path, ids)
    dup = "5b6c7d8e9fa0b1c2_m01g317_1a2b3c4d.png"
    (tmp_path / "train-masks" / dup).write_bytes((tmp_path / "train-masks-5" / dup).read_bytes())
    ds = open_dataset("openimages", tmp_path, split="train")
    assert len(ds) == 4
    where = {ds.sample_info(i)["mask"] for i in range(4)}
    assert where == {str(tmp_path / "train-masks" / "0a1b2c3d4e5f6071_m01g317_1a2b3c4d.png"),
                     str(tmp_path / "train-masks" / "train-masks-1" / "1b2c3d4e5f607182_m01g317_1a2b3c4d.png"),
                     str(tmp_path / "train-masks" / dup),
                     str(tmp_path / "train-masks-f" / "f0e1d2c3b4a59687_m01g317_1a2b3c4d.png")}
    assert all(int(ds[i]["mask1"].sum()) == 10 * 12 for i in range(4))
    # an explicit mask_dir is taken as it is: the folders beside the default one are not searched
    ds = open_dataset("openimages", tmp_path, split="train", mask_dir=str(tmp_path / "train-masks"),
                      max_bad_fraction=0.5)
    assert len(ds) == 3


def test_refcoco_with_coco2017_image_names(tmp_path):
    """RefCOCO's instances.json names its images as COCO 2014 does (`COCO_train2014_000000581857.jpg`, lichengunc/refer
    data); COCO 2017's `train2017/` holds the same images (train2014 ⊂ train2017) as `000000581857.jpg`. With
    image_root pointing there every ref was reported missing and the dataset refused."""
    image_id, h, w = 581857, 30, 40
    train2017 = tmp_path / "coco" / "train2017"
    train2017.mkdir(parents=True)
    Image.fromarray(np.full((h, w, 3), 60, np.uint8)).save(train2017 / f"{image_id:012d}.jpg")
    data = tmp_path / "refer" / "refcoco"
    data.mkdir(parents=True)
    polygon = [[5.0, 5.0, 30.0, 5.0, 30.0, 20.0, 5.0, 20.0]]
    with open(data / "instances.json", "w") as f:
        json.dump({"images": [{"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "height": h,
                               "width": w}],
                   "annotations": [{"id": 7, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                    "segmentation": polygon, "area": 375.0, "bbox": [5.0, 5.0, 25.0, 15.0]}],
                   "categories": [{"id": 1, "name": "person"}]}, f)
    refs = [{"ref_id": 3, "ann_id": 7, "image_id": image_id, "split": "train", "category_id": 1, "sent_ids": [9, 10],
             "file_name": f"COCO_train2014_{image_id:012d}_7.jpg",
             "sentences": [{"tokens": ["left", "man"], "raw": "Left man", "sent_id": 9, "sent": "left man"},
                           {"tokens": ["guy"], "raw": "guy", "sent_id": 10, "sent": "guy"}]}]
    with open(data / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)

    ds = open_dataset("refcoco", tmp_path / "refer", split="train", image_root=str(train2017))
    item = ds[0]
    assert item["captions"] == ["left man", "guy"]
    assert ds.sample_info(0)["image"] == str(train2017 / f"{image_id:012d}.jpg")
    truth = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, h, w)))
    np.testing.assert_array_equal(item["mask1"].numpy(), truth)
