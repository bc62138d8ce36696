"""`dualloop synth-data` and `dualloop verify-data`: exit codes, the table and the JSON report."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from dualloop.cli import main as cli_main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools+numpy2


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert cli_main(["synth-data", "--out", str(out), "--seed", "4"]) == 0
    return out


def test_synth_data_writes_all_layouts_and_config(corpus_dir):
    cfg = yaml.safe_load(open(corpus_dir / "data.yaml"))
    data = cfg["data"]
    assert data["seed"] == 4
    assert {d["kind"] for d in data["datasets"]} == {"sav", "sa1b", "openimages", "refcoco"}
    assert {d["kind"] for d in data["eval_datasets"]} == {"sav", "sa1b", "openimages", "refcoco"}
    train_roots = {(d["root"], d.get("split")) for d in data["datasets"]}
    assert not train_roots & {(d["root"], d.get("split")) for d in data["eval_datasets"]}  # held out
    for rel in ("sav/train/sav_000/sav_000001.mp4", "sav/train/sav_000/sav_000001_manual.json",
                "sav_jpeg/JPEGImages_24fps", "sav_jpeg/Annotations_6fps", "sav_npz/pair_0000.npz",
                "sa1b/train/sa_1.jpg", "sa1b/train/sa_1.json", "openimages/oidv7-class-descriptions.csv",
                "openimages/train-annotations-object-segmentation.csv", "openimages/train-masks/train-masks-f",
                "openimages/validation-annotations-object-segmentation.csv", "refcoco/refcoco/instances.json",
                "refcoco/refcoco/refs(unc).p"):
        assert os.path.exists(corpus_dir / rel), rel


def test_synth_data_is_deterministic_and_scales(tmp_path):
    from dualloop.data import write_synthetic_corpus

    a = write_synthetic_corpus(tmp_path / "a", seed=9)
    b = write_synthetic_corpus(tmp_path / "b", seed=9)
    for rel in ("sa1b/train/sa_7.json", "refcoco/refcoco/instances.json"):
        assert open(os.path.join(a["root"], rel)).read() == open(os.path.join(b["root"], rel)).read()
    big = write_synthetic_corpus(tmp_path / "big", seed=9, scale=2)
    assert len(os.listdir(big["sa1b"])) == 2 * len(os.listdir(a["sa1b"]))
    assert cli_main(["synth-data", "--out", str(tmp_path / "x"), "--scale", "0"]) == 2


def test_verify_data_ok_with_json(corpus_dir, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = cli_main(["verify-data", "--config", str(corpus_dir / "data.yaml"), "--json", str(report),
                     "--samples", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    rep = json.loads(report.read_text())
    assert rep["problems"] == []
    assert [r["name"] for r in rep["datasets"]] == ["sav", "sav_jpeg", "sa1b", "openimages", "refcoco"]
    assert rep["total"] == sum(r["effective"] for r in rep["datasets"]) > 0
    assert all(r["effective"] == r["samples"] * r["repeats"] for r in rep["datasets"])
    assert set(rep["datasets"][0]) == {"name", "kind", "root", "samples", "repeats", "effective"}
    assert "total" in out and "refcoco" in out and "no problems" in out


def test_verify_data_reports_problems_and_exits_1(corpus_dir, tmp_path, capsys):
    cfg = yaml.safe_load(open(corpus_dir / "data.yaml"))
    cfg["data"]["datasets"].append({"name": "ghost", "kind": "sa1b", "root": str(tmp_path / "missing")})
    cfg["data"]["datasets"].append({"name": "sa1b", "kind": "sa1b", "root": str(tmp_path / "gone")})
    cfg["data"]["datasets"].append({"name": "typo", "kind": "sa1b", "root": str(corpus_dir / "sa1b/train"),
                                    "max_filez": 2})
    victim = corpus_dir / "sa1b/val/sa_800001.jpg"
    original = victim.read_bytes()
    victim.write_bytes(b"broken")
    cfg["data"]["eval_datasets"] = [{"name": "sa1b_val", "kind": "sa1b", "root": str(corpus_dir / "sa1b/val")}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = tmp_path / "report.json"
    try:
        code = cli_main(["verify-data", "--config", str(path), "--json", str(report), "--samples", "40"])
    finally:
        victim.write_bytes(original)
    rep = json.loads(report.read_text())
    text = "\n".join(rep["problems"])
    assert code == 1
    assert "ghost: sa1b: dataset root" in text and "does not exist" in text
    assert f"sa1b: dataset root '{tmp_path / 'gone'}'" in text and "sa1b: sa1b:" not in text  # named once
    assert "typo" in text and "max_filez" in text
    assert "sa_800001.jpg" in text and "unreadable image" in text
    assert "problem(s)" in capsys.readouterr().out


def test_verify_data_unreadable_config_exits_2(tmp_path):
    assert cli_main(["verify-data", "--config", str(tmp_path / "none.yaml")]) == 2
    (tmp_path / "x.yaml").write_text("data: {seed: 0}\n")
    assert cli_main(["verify-data", "--config", str(tmp_path / "x.yaml")]) == 2


def test_console_entry_point(corpus_dir):
    proc = subprocess.run([sys.executable, "-m", "dualloop.cli", "verify-data", "--config",
                           str(corpus_dir / "data.yaml"), "--samples", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
