"""Bad input: missing roots, corrupt images, truncated JSON, RLE size mismatch, unreadable PNG, missing files."""
import json
import logging
import os
import shutil

import pytest

from dualloop.data import DataError, open_dataset, write_synthetic_corpus
from dualloop.data import sa1b as sa1b_module
from dualloop.data import sav as sav_module

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools+numpy2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=5)


@pytest.fixture(autouse=True)
def fresh_caches():
    # A new worker process starts without parsed JSON; tests edit files after opening, so mimic that.
    sa1b_module._load_json.cache_clear()
    sav_module._load_json.cache_clear()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _sa1b_subset(corpus, tmp_path, n=10):
    dst = tmp_path / "sa1b"
    dst.mkdir()
    for k in range(1, n + 1):
        for ext in (".jpg", ".json"):
            shutil.copy(os.path.join(corpus["sa1b"], f"sa_{k}{ext}"), dst)
    return str(dst)


@pytest.mark.parametrize("kind", ["sav", "sa1b", "openimages", "refcoco"])
def test_missing_root_raises_naming_what_was_looked_for(kind, tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        open_dataset(kind, tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


@pytest.mark.parametrize("kind,needle", [("sav", "mp4"), ("sa1b", "sa_"), ("openimages", "csv"),
                                         ("refcoco", "instances.json")])
def test_root_without_expected_files_raises(kind, needle, tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match=needle):
        open_dataset(kind, tmp_path)


def test_corrupt_jpeg_is_replaced_deterministically_and_logged(corpus, tmp_path, caplog):
    root = _sa1b_subset(corpus, tmp_path)
    good = open_dataset("sa1b", root, max_bad_fraction=0.5)
    victim = good.sample_info(0)["image"]
    good_keys = [good[i]["key"] for i in range(len(good))]
    with open(victim, "r+b") as f:  # destroy the data in place
        f.write(b"\0" * 200)
    ds = open_dataset("sa1b", root, max_bad_fraction=0.5)
    bad_indices = [i for i in range(len(ds)) if ds.sample_info(i)["image"] == victim]
    with caplog.at_level(logging.WARNING, logger="dualloop.data"):
        items = [ds[i] for i in range(len(ds))]
    for i in bad_indices:
        assert items[i]["key"] != good_keys[i] and items[i]["key"] in good_keys[len(bad_indices):]
    assert sorted(ds.bad) == bad_indices
    assert victim in caplog.text and "replaced" in caplog.text
    again = open_dataset("sa1b", root, max_bad_fraction=0.5)
    assert [again[i]["key"] for i in bad_indices] == [items[i]["key"] for i in bad_indices]


def test_too_many_bad_samples_raise_with_summary(corpus, tmp_path):
    root = _sa1b_subset(corpus, tmp_path)
    for k in (1, 2, 3, 4):
        with open(os.path.join(root, f"sa_{k}.jpg"), "r+b") as f:
            f.write(b"garbage!" * 20)
    ds = open_dataset("sa1b", root, max_bad_fraction=0.1)
    with pytest.raises(DataError, match="max_bad_fraction") as e:
        for i in range(len(ds)):
            ds[i]
    assert "sa_" in str(e.value) and "unreadable image" in str(e.value)


def test_truncated_json_at_index_time(corpus, tmp_path):
    root = _sa1b_subset(corpus, tmp_path)
    path = os.path.join(root, "sa_3.json")
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    with pytest.raises(DataError, match="sa_3.json"):
        open_dataset("sa1b", root)  # 1 of 10 files > 1 %
    ds = open_dataset("sa1b", root, max_bad_fraction=0.2)
    assert any("sa_3.json" in p and "unreadable" in p for p in ds.problems())
    assert all(ds.sample_info(i)["json"] != path for i in range(len(ds)))


def test_truncated_json_and_rle_size_mismatch_at_load_time(corpus, tmp_path):
    root = _sa1b_subset(corpus, tmp_path)
    ds = open_dataset("sa1b", root, max_bad_fraction=0.9)
    # after indexing: sa_2.json truncated, sa_4.json's first RLE claims another size
    p2, p4 = os.path.join(root, "sa_2.json"), os.path.join(root, "sa_4.json")
    open(p2, "w").write(open(p2).read()[:100])
    rec = json.load(open(p4))
    rec["annotations"][0]["segmentation"] = {"size": [32, 32], "counts": "0PP0"}
    json.dump(rec, open(p4, "w"))
    for i in range(len(ds)):
        ds[i]
    reasons = list(ds.bad.values())
    assert any("sa_2.json" in r and "unreadable annotation JSON" in r for r in reasons)
    assert any("sa_4.json" in r and "RLE size 32x32 differs from the image size 64x64" in r for r in reasons)


def test_unreadable_png_in_openimages_is_replaced(corpus, tmp_path):
    root = _copy(corpus["openimages"], tmp_path / "oi")
    ds = open_dataset("openimages", root, split="validation", max_bad_fraction=0.5)
    victim = ds.sample_info(2)["mask"]
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.write(b"\x89PNG broken" + b"\0" * max(size - 11, 0))
    ds = open_dataset("openimages", root, split="validation", max_bad_fraction=0.5)
    item = ds[2]
    assert item["key"] != os.path.basename(victim)[:-4]
    assert "unreadable mask PNG" in ds.bad[2] and victim in ds.bad[2]


def test_missing_files_found_at_index_time(corpus, tmp_path):
    root = _copy(corpus["openimages"], tmp_path / "oi")
    full = open_dataset("openimages", root, split="validation")
    image = full.sample_info(0)["image"]
    n_rows = sum(full.sample_info(i)["image"] == image for i in range(len(full)))
    mask = full.sample_info(len(full) - 1)["mask"]
    os.remove(image)
    os.remove(mask)
    with pytest.raises(DataError, match="missing"):
        open_dataset("openimages", root, split="validation")
    ds = open_dataset("openimages", root, split="validation", max_bad_fraction=0.5)
    assert len(ds) == len(full) - n_rows - 1
    text = " ".join(ds.problems())
    assert os.path.basename(image)[:-4] in text and os.path.basename(mask) in text


def test_refcoco_missing_image_and_missing_refs(corpus, tmp_path):
    root = _copy(corpus["refcoco"], tmp_path / "ref")
    full = open_dataset("refcoco", root, split="val")
    os.remove(full.sample_info(0)["image"])
    ds = open_dataset("refcoco", root, split="val", max_bad_fraction=0.5)
    assert len(ds) < len(full) and "missing" in ds.problems()[0]
    with pytest.raises(DataError, match=r"refs\(umd\).p not found"):
        open_dataset("refcoco", root, split_by="umd")


def test_sav_bad_json_missing_video_and_corrupt_video(corpus, tmp_path):
    root = _copy(corpus["sav"], tmp_path / "sav")
    folder = os.path.join(root, "sav_000")
    open(os.path.join(folder, "sav_000002_manual.json"), "w").write('{"masklet": [[{"size": [64')
    os.remove(os.path.join(folder, "sav_000003.mp4"))
    ds = open_dataset("sav", root, max_bad_fraction=0.5)
    text = " ".join(ds.problems())
    assert "sav_000002_manual.json" in text and "sav_000003.mp4 is missing" in text
    video = os.path.join(folder, "sav_000004.mp4")
    size = os.path.getsize(video)
    with open(video, "r+b") as f:  # same size, destroyed payload after the header boxes
        f.seek(size // 3)
        f.write(b"\0" * (size - size // 3))
    ds = open_dataset("sav", root, max_bad_fraction=0.5)
    idx = [i for i in range(len(ds)) if ds.sample_info(i)["video"] == video]
    assert idx
    for i in idx:
        item = ds[i]
        assert "sav_000004" not in item["key"]
    assert all("sav_000004.mp4" in ds.bad[i] for i in idx)


def test_sav_jpeg_unreadable_png_at_index_time(corpus, tmp_path):
    root = _copy(corpus["sav_jpeg"], tmp_path / "jpeg")
    png = os.path.join(root, "Annotations_6fps", "sav_900001", "000", "00004.png")
    open(png, "wb").write(b"not a png")
    ds = open_dataset("sav", root, max_bad_fraction=0.5)
    assert any("00004.png" in p for p in ds.problems())


def test_macos_appledouble_files_are_not_read_as_data(corpus, tmp_path):
    """A copy from a Mac leaves `._<name>` resource-fork files next to each file: `._sav_000001_manual.json` is not
    JSON, and was reported as a broken annotation file."""
    root = _copy(corpus["sav"], tmp_path / "sav")
    clean = len(open_dataset("sav", root))
    folder = os.path.join(root, "sav_000")
    for name in ("sav_000001_manual.json", "sav_000001.mp4"):
        open(os.path.join(folder, "._" + name), "wb").write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    ds = open_dataset("sav", root)
    assert len(ds) == clean and not ds.problems()
