"""Every reader and layout on a synthetic corpus: counts, masks vs the encoded truth, pairing, captions, options."""
import csv
import json
import os
import pickle

import av
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from dualloop.data import DataError, open_dataset, write_synthetic_corpus
from dualloop.data.sav import select_anchors
from dualloop.data.synthetic import VOCABULARY

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools+numpy2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=3)


def _rle_truth(rle, h, w):
    if isinstance(rle, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(rle, h, w)))
    r = dict(rle)
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode()
    return mask_utils.decode(r)


def _all_frames(path):
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _check_single(item, kind):
    assert item["source"] == kind and item["paired"] is False
    assert item["image2"] is item["image1"] and item["mask2"] is item["mask1"]
    img, m = item["image1"], item["mask1"]
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
    assert m.dtype == torch.uint8 and tuple(m.shape) == tuple(img.shape[1:])
    assert set(torch.unique(m).tolist()) <= {0, 1} and m.sum() > 0


# ---------------------------------------------------------------------------------------------------- SA-V
def test_select_anchors_linspace_rule():
    present = np.array([1, 1, 0, 1, 1, 1, 1, 1, 1, 1], bool)  # valid anchors for gap 1: 0,3,4,5,6,7,8
    assert select_anchors(present, 1, None) == [0, 3, 4, 5, 6, 7, 8]
    assert select_anchors(present, 1, 4) == [0, 4, 6, 8]  # positions round(linspace(0, 6, 4)) = 0, 2, 4, 6
    assert select_anchors(present, 1, 1) == [0]
    assert select_anchors(present, 1, 10) == [0, 3, 4, 5, 6, 7, 8]  # deduplicated positions
    assert select_anchors(present, 3, None) == [0, 1, 3, 4, 5, 6]  # i=2 absent; 7.. run past the end
    assert select_anchors(np.zeros(5, bool), 1, 4) == []


def test_video_frames_after_seeking_are_the_right_ones(tmp_path):
    from dualloop.data.sav import read_video_frames

    path = str(tmp_path / "count.mp4")
    with av.open(path, "w") as c:  # frame k shows grey level 2k; a keyframe every 10 frames, B-frames allowed
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=24)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.options = {"g": "10", "bf": "2", "crf": "0"} if s.codec_context.name == "libx264" else {}
        for k in range(120):
            frame = np.full((32, 32, 3), 2 * k, np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    got = read_video_frames(path, [97, 33, 0, 58])
    assert sorted(got) == [0, 33, 58, 97]
    for k, frame in got.items():
        assert abs(float(frame.mean()) - 2 * k) < 2, (k, frame.mean())
    from dualloop.data.masks import BadSample

    with pytest.raises(BadSample, match="no frame"):
        read_video_frames(path, [130])


def _video_truth(root, suffix="_manual.json", gap=4, k=4):
    """Expected (json, obj, i, j) from the JSON files, computed independently of the reader."""
    out = []
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if not name.endswith(suffix):
                continue
            masklet = json.load(open(os.path.join(dirpath, name)))["masklet"]
            n_obj = max(len(fr) for fr in masklet)
            for o in range(n_obj):
                pres = [bool(fr[o]) and mask_utils.area(_enc(fr[o])) > 0 for fr in masklet]
                valid = [i for i in range(len(pres) - gap) if pres[i] and pres[i + gap]]
                if k is not None and valid:
                    pos = sorted(set(int(x) for x in np.round(np.linspace(0, len(valid) - 1, k))))
                    valid = [valid[p] for p in pos]
                out += [(os.path.join(dirpath, name), o, i, i + gap) for i in valid]
    return out


def _enc(rle):
    return {"size": rle["size"], "counts": rle["counts"].encode()}


def test_sav_video_pairs_masks_and_frames(corpus):
    ds = open_dataset("sav", corpus["sav"])
    assert ds.layout == "video"
    truth = _video_truth(corpus["sav"])
    assert len(ds) == len(truth) > 0
    late = 0
    for idx in range(0, len(ds), 7):
        jpath, o, i, j = truth[idx]
        item = ds[idx]
        assert item["paired"] is True and item["source"] == "sav" and item["captions"] == []
        masklet = json.load(open(jpath))["masklet"]
        np.testing.assert_array_equal(item["mask1"].numpy(), _rle_truth(masklet[i][o], 64, 64))
        np.testing.assert_array_equal(item["mask2"].numpy(), _rle_truth(masklet[j][o], 64, 64))
        frames = _all_frames(jpath.replace("_manual.json", ".mp4"))
        np.testing.assert_array_equal(item["image1"].permute(1, 2, 0).numpy(), frames[4 * i])
        np.testing.assert_array_equal(item["image2"].permute(1, 2, 0).numpy(), frames[4 * j])
        vid = os.path.basename(jpath)[: -len("_manual.json")]
        assert item["key"] == f"{vid}/manual/obj{o:03d}/f{4 * i:05d}-f{4 * j:05d}"
        late += i > 0
    info = ds.sample_info(0)
    assert info["frame2"] - info["frame1"] == 16


def test_sav_video_options(corpus):
    base = len(open_dataset("sav", corpus["sav"]))
    assert len(open_dataset("sav", corpus["sav"], pairs_per_object=None)) == \
        len(_video_truth(corpus["sav"], k=None)) >= base
    one = open_dataset("sav", corpus["sav"], pairs_per_object=1)
    assert len(one) == len(_video_truth(corpus["sav"], k=1))
    gap2 = open_dataset("sav", corpus["sav"], frame_gap=2, pairs_per_object=None)
    assert len(gap2) == len(_video_truth(corpus["sav"], gap=2, k=None))
    assert gap2.sample_info(0)["frame2"] - gap2.sample_info(0)["frame1"] == 8
    auto = open_dataset("sav", corpus["sav"], annotations="auto")
    both = open_dataset("sav", corpus["sav"], annotations="both")
    assert len(auto) == len(_video_truth(corpus["sav"], suffix="_auto.json")) > 0
    assert len(both) == base + len(auto)
    assert any("/auto/" in both[i]["key"] for i in range(len(both)))
    with pytest.raises(ValueError, match="annotations"):
        open_dataset("sav", corpus["sav"], annotations="nope")
    with pytest.raises(DataError, match="npz"):
        open_dataset("sav", corpus["sav"], layout="npz")


def test_sav_jpeg_layout(corpus):
    root = corpus["sav_jpeg"]
    ds = open_dataset("sav", root)
    assert ds.layout == "jpeg" and len(ds) > 0
    for idx in range(len(ds)):
        item = ds[idx]
        info = ds.sample_info(idx)
        video, obj = item["key"].split("/")[:2]
        for tag, frame in (("1", info["frame1"]), ("2", info["frame2"])):
            png = np.asarray(Image.open(os.path.join(root, "Annotations_6fps", video, obj, f"{frame:05d}.png")))
            np.testing.assert_array_equal(item[f"mask{tag}"].numpy(), (png != 0).astype(np.uint8))
            jpg = np.asarray(Image.open(os.path.join(root, "JPEGImages_24fps", video, f"{frame:05d}.jpg")))
            np.testing.assert_array_equal(item[f"image{tag}"].permute(1, 2, 0).numpy(), jpg)
        assert item["paired"] and item["mask1"].sum() > 0 and item["mask2"].sum() > 0
    # video 0's object 000 appears at frame 8 (annotated frame 2): with gap 4 of 8 annotated frames, anchors 2, 3
    every = open_dataset("sav", root, layout="jpeg", pairs_per_object=None)
    late = [every.sample_info(i) for i in range(len(every)) if every[i]["key"].startswith("sav_900000/000/")]
    assert [(d["frame1"], d["frame2"]) for d in late] == [(8, 24), (12, 28)]



def _extract_like_sam2(corpus_sav, gt_dir, frames_dir, every=4, skip=()):
    """SAM2's training layout from the video corpus: the JSONs alone in gt_dir, every `every`-th frame as
    `<frames_dir>/<video>/<frame:05d>.jpg` (sam2 training/scripts/sav_frame_extraction_submitit.py); frames in
    `skip` (video, frame) are not written."""
    for dirpath, _, files in os.walk(corpus_sav):
        for name in files:
            if not name.endswith("_manual.json"):
                continue
            vid = name[: -len("_manual.json")]
            (gt_dir / name).write_bytes(open(os.path.join(dirpath, name), "rb").read())
            (frames_dir / vid).mkdir(parents=True)
            for k, frame in enumerate(_all_frames(os.path.join(dirpath, vid + ".mp4"))):
                if k % every == 0 and (vid, k) not in skip:
                    Image.fromarray(frame).save(frames_dir / vid / f"{k:05d}.jpg", quality=98)


def test_sav_frames_layout_reads_sam2_extracted_frames(corpus, tmp_path):
    """Users who prepared SA-V for SAM2's training have the JSONs and extracted JPEG frames, not the mp4s."""
    gt, frames = tmp_path / "sav_train", tmp_path / "JPEGImages_24fps"
    gt.mkdir()
    first = sorted(p for p in os.listdir(corpus["sav"]) if p.startswith("sav_"))  # sav_000/ ...
    skip = {("sav_000001", 8)}  # one frame never extracted: the pairs that need it are left out, not broken
    _extract_like_sam2(os.path.join(corpus["sav"], first[0]), gt, frames, skip=skip)
    video = open_dataset("sav", os.path.join(corpus["sav"], first[0]), pairs_per_object=None)
    ds = open_dataset("sav", gt, frames_dir=str(frames), pairs_per_object=None)  # autodetected: no mp4 under root
    assert ds.layout == "frames"
    by_key = {video[i]["key"]: i for i in range(len(video))}
    keys = [ds[i]["key"] for i in range(len(ds))]
    assert not any(k.startswith("sav_000001/") and ("f00008" in k) for k in keys)
    assert set(keys) == {k for k in by_key if not (k.startswith("sav_000001/") and "f00008" in k)}
    for i in range(0, len(ds), 3):
        item, ref = ds[i], video[by_key[keys[i]]]
        np.testing.assert_array_equal(item["mask1"].numpy(), ref["mask1"].numpy())
        np.testing.assert_array_equal(item["mask2"].numpy(), ref["mask2"].numpy())
        for tag in ("image1", "image2"):  # the same frame, through a JPEG
            assert (item[tag].float() - ref[tag].float()).abs().mean() < 3
        assert ds.sample_info(i)["video"] == str(frames / keys[i].split("/")[0])
    with pytest.raises(DataError, match="frames_dir"):
        open_dataset("sav", gt, layout="frames", frames_dir=str(tmp_path / "nowhere"))

def test_sav_npz_layout(corpus):
    ds = open_dataset("sav", corpus["sav_npz"])
    assert ds.layout == "npz" and len(ds) == 6  # 3 single-pair files + one file of 3 stacked pairs
    keys = [ds[i]["key"] for i in range(len(ds))]
    assert keys == ["pair_0000.npz", "pair_0001.npz", "pair_0002.npz", "pairs_batch.npz#0", "pairs_batch.npz#1",
                    "pairs_batch.npz#2"]
    z = np.load(os.path.join(corpus["sav_npz"], "pairs_batch.npz"))
    item = ds[4]
    np.testing.assert_array_equal(item["image2"].permute(1, 2, 0).numpy(), z["frame2"][1])
    np.testing.assert_array_equal(item["mask1"].numpy(), (z["mask1"][1] != 0).astype(np.uint8))
    assert item["paired"] is True


# ---------------------------------------------------------------------------------------------------- SA-1B
def test_sa1b_annotations_and_options(corpus):
    root = corpus["sa1b"]
    ds = open_dataset("sa1b", root)
    records = {n: json.load(open(os.path.join(root, n))) for n in sorted(os.listdir(root)) if n.endswith(".json")}
    assert len(ds) == sum(len(r["annotations"]) for r in records.values())
    for idx in range(0, len(ds), 9):
        item = ds[idx]
        _check_single(item, "sa1b")
        stem, ann_id = item["key"].split("/")
        ann = next(a for a in records[stem + ".json"]["annotations"] if a["id"] == int(ann_id))
        np.testing.assert_array_equal(item["mask1"].numpy(), _rle_truth(ann["segmentation"], 64, 64))
        assert item["captions"] == []
    names = sorted(n for n in records)[:5]
    assert len(open_dataset("sa1b", root, max_files=5)) == sum(len(records[n]["annotations"]) for n in names)
    thr = 0.9
    assert len(open_dataset("sa1b", root, min_predicted_iou=thr)) == sum(
        a["predicted_iou"] >= thr for r in records.values() for a in r["annotations"])
    frac = 0.04
    assert len(open_dataset("sa1b", root, min_area_frac=frac)) == sum(
        a["area"] / 64 ** 2 >= frac for r in records.values() for a in r["annotations"])


# ---------------------------------------------------------------------------------------------------- OpenImages
def _oi_rows(root, split):
    with open(os.path.join(root, f"{split}-annotations-object-segmentation.csv")) as f:
        return list(csv.DictReader(f))


def _oi_truth(root, split, row):
    folder = os.path.join(root, f"{split}-masks")
    sub = os.path.join(folder, f"{split}-masks-{row['MaskPath'][0]}")
    path = os.path.join(sub if os.path.isdir(sub) else folder, row["MaskPath"])
    im = Image.open(path)
    arr = np.asarray(im)
    m = (arr != 0) if im.mode == "1" else (arr >= 128)
    if m.shape != (64, 64):  # stored at 2x: nearest resize picks every other pixel
        m = m[::2, ::2]
    return m.astype(np.uint8)


@pytest.mark.parametrize("split", ["train", "validation"])  # 16 subfolders / flat
def test_openimages_masks_and_captions(corpus, split):
    root = corpus["openimages"]
    ds = open_dataset("openimages", root, split=split)
    rows = _oi_rows(root, split)
    assert len(ds) == len(rows)
    names = {r[0]: r[1] for r in csv.reader(open(os.path.join(root, "oidv7-class-descriptions.csv")))}
    for idx, row in enumerate(rows):
        item = ds[idx]
        _check_single(item, "openimages")
        assert item["key"] == row["MaskPath"][:-4]
        assert item["captions"] == [names[row["LabelName"]]]
        np.testing.assert_array_equal(item["mask1"].numpy(), _oi_truth(root, split, row))
    assert ds.sample_info(0)["label"] == rows[0]["LabelName"]


def test_openimages_boxable_descriptions_and_no_descriptions(corpus, tmp_path):
    root = corpus["openimages"]
    boxable = tmp_path / "class-descriptions-boxable.csv"  # no header
    lines = open(os.path.join(root, "oidv7-class-descriptions.csv")).read().splitlines()[1:]
    boxable.write_text("\n".join(line.replace(",", ",Thing ") for line in lines) + "\n")
    ds = open_dataset("openimages", root, split="validation", class_descriptions=str(boxable))
    assert ds[0]["captions"][0].startswith("Thing ")


# ---------------------------------------------------------------------------------------------------- RefCOCO
def test_refcoco_refs_sentences_and_masks(corpus):
    root, images = corpus["refcoco"], corpus["refcoco_images"]
    refs = pickle.load(open(os.path.join(root, "refcoco", "refs(unc).p"), "rb"))
    inst = json.load(open(os.path.join(root, "refcoco", "instances.json")))
    anns = {a["id"]: a for a in inst["annotations"]}
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    kinds = set()
    for split in ("train", "val", "testA", "testB"):
        ds = open_dataset("refcoco", root, split=split, image_root=images)
        mine = [r for r in refs if r["split"] == split]
        assert len(ds) == len(mine)
        for idx in range(0, len(ds), 5):
            item, ref = ds[idx], mine[idx]
            _check_single(item, "refcoco")
            assert item["key"] == f"refcoco/unc/ref{ref['ref_id']}"
            assert item["captions"] == [s["sent"] for s in ref["sentences"]]
            seg = anns[ref["ann_id"]]["segmentation"]
            kinds.add(type(seg).__name__)
            np.testing.assert_array_equal(item["mask1"].numpy(), _rle_truth(seg, 64, 64))
    assert kinds == {"list", "dict"}  # polygons and RLE both exercised
    sent = open_dataset("refcoco", root, split="val", unit="sentence", image_root=images)
    val = [r for r in refs if r["split"] == "val"]
    assert len(sent) == sum(len(r["sentences"]) for r in val)
    first = val[0]["sentences"]
    assert [sent[i]["captions"] for i in range(len(first))] == [[s["sent"]] for s in first]
    assert sent[1]["key"] == f"refcoco/unc/ref{val[0]['ref_id']}/sent{first[1]['sent_id']}"
    # default image_root is <root>/images
    assert len(open_dataset("refcoco", root, split="val")) == len(val)


def test_captions_use_only_the_agreed_vocabulary(corpus):
    words = set(VOCABULARY)
    ds = open_dataset("refcoco", corpus["refcoco"])
    oi = open_dataset("openimages", corpus["openimages"])
    texts = [c for i in range(len(ds)) for c in ds[i]["captions"]] + [c for i in range(len(oi)) for c in
                                                                       oi[i]["captions"]]
    used = {w.strip(".,").lower() for t in texts for w in t.split()}
    assert used <= words, used - words
    full = [c[0] for c in (ds[i]["captions"] for i in range(len(ds)))]
    assert all(len(t.split()) >= 6 for t in full)  # "the {size} {colour} {shape} {position...}"


def test_full_expression_is_unique_in_its_image(corpus):
    root = corpus["refcoco"]
    refs = pickle.load(open(os.path.join(root, "refcoco", "refs(unc).p"), "rb"))
    by_image = {}
    for r in refs:
        for s in r["sentences"]:
            by_image.setdefault(r["image_id"], {}).setdefault(s["sent"], set()).add(r["ref_id"])
    assert all(len(ids) == 1 for sents in by_image.values() for ids in sents.values())


def test_unknown_kind_and_option():
    with pytest.raises(ValueError, match="unknown dataset kind"):
        open_dataset("coco", "/tmp")
    with pytest.raises(ValueError, match="max_filez"):
        open_dataset("sa1b", "/tmp", max_filez=3)
