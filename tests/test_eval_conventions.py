"""`dualloop eval` against the RefCOCO referring-segmentation conventions of LISA / Sa2VA evaluation code:
every sentence of a ref is one sample, an empty target with an empty prediction scores IoU 1, the whole split can
be scored, and the CLI reports unusable splits / configs as errors. A stub model keeps these tests fast."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dualloop.data.base import make_item
from dualloop.eval import evaluate as ev
from dualloop.eval.metrics import IoUMeter


class StubModel(torch.nn.Module):
    """caption() → one token; a caption starting with "hit" grounds the whole image, "miss" nothing."""

    pad_token_id = 0

    def caption(self, images, masks, max_new_tokens=16, **_):
        n = len(images)
        return SimpleNamespace(ids=torch.ones(n, 1, dtype=torch.long), lengths=torch.ones(n, dtype=torch.long),
                               texts=["hit"] * n)

    def encode_queries(self, captions):
        ids = torch.tensor([[3 if c.startswith("miss") else 2] for c in captions])
        return ids, torch.ones(len(captions), dtype=torch.long)

    def ground(self, images, caption_ids, caption_lengths, queries=None, **_):
        self.queries = getattr(self, "queries", []) + [queries]
        sign = torch.where(caption_ids[:, 0] == 3, -10.0, 10.0)
        return SimpleNamespace(logits=sign[:, None, None].expand(len(images), 4, 4).clone())


def _item(key, captions, mask=None):
    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.ones((8, 8), np.uint8) if mask is None else mask
    return make_item(image, mask, source="refcoco", key=key, captions=captions)


def test_every_sentence_of_a_ref_is_a_grounding_sample():
    # LISA utils/dataset.py ValDataset and Sa2VA evaluation/dataset/RES.py: one prediction per sentence of each ref
    ds = [_item(f"ref{k}", ["hit the cat", "miss: the cat on the left"]) for k in range(3)]
    model = StubModel()
    res = ev.evaluate_model(model, {"refcoco_val": ds}, samples=None, batch_size=2)
    # each call: the batch's captions, then its sentences (text queries: encode_queries' ids, read in the sentence)
    assert model.queries == [[False, False, True, True, True, True], [False, True, True]]
    g = res["grounding"]
    assert g["samples"] == 6  # 3 refs x 2 sentences
    assert g["giou"] == pytest.approx(0.5) and g["ciou"] == pytest.approx(0.5)
    assert res["cycle"]["samples"] == 3  # the cycle scores each ref (object) once


class GatedStubModel(StubModel):
    """StubModel whose SAM2 says "no object" for the ground-truth captions starting with "hit the dog"."""

    def __init__(self, object_gate: bool):
        super().__init__()
        self.model_cfg = SimpleNamespace(object_gate=object_gate)

    def encode_queries(self, captions):
        ids, lengths = super().encode_queries(captions)
        return torch.where(torch.tensor([[c.startswith("hit the dog")] for c in captions]), 4, ids), lengths

    def ground(self, images, caption_ids, caption_lengths, **_):
        out = super().ground(images, caption_ids, caption_lengths)
        return SimpleNamespace(logits=out.logits, object_score=torch.where(caption_ids[:, 0] == 4, -1.0, 1.0))


@pytest.mark.parametrize("object_gate", [False, True])
def test_the_object_gate_empties_the_masks_sam2_says_are_absent(object_gate):
    # SAM2's video predictor (not Sa2VA's, which comments it out): a mask whose object score is <= 0 is set to
    # NO_OBJ_SCORE, empty
    ds = [_item("ref0", ["hit the cat", "hit the dog"])]
    res = ev.evaluate_model(GatedStubModel(object_gate), {"refcoco_val": ds}, samples=None, batch_size=2)
    assert res["grounding"]["giou"] == pytest.approx(0.5 if object_gate else 1.0)
    assert res["cycle"]["giou"] == pytest.approx(1.0)  # its generated caption's object is there


def test_empty_target_and_empty_prediction_scores_one():
    # LISA train_ds.py validate(): acc_iou[union == 0] += 1.0 ("no-object target")
    m = IoUMeter()
    m.add(0, 0)
    m.add(5, 10)
    assert m.summary()["giou"] == pytest.approx(0.75)
    assert m.summary()["ciou"] == pytest.approx(0.5)
    empty = torch.zeros(8, 8, dtype=torch.uint8)
    ious = IoUMeter().add_logits(torch.stack([torch.full((4, 4), -5.0), torch.full((4, 4), 5.0)]),
                                 [empty, empty], ["a", "a"])
    assert ious == [1.0, 0.0]


def test_samples_zero_scores_the_whole_split():
    assert ev.eval_indices(7, 0) == list(range(7))
    assert ev.eval_indices(7, None) == list(range(7))
    assert ev.eval_indices(7, 3) == [0, 3, 6]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """main() with the stub model and recorded open_dataset calls (kind, root, options)."""
    import dualloop.data
    import dualloop.train.export

    monkeypatch.setattr(dualloop.train.export, "load_trained_model", lambda ckpt, cfg: StubModel())
    opened = []

    def open_dataset(kind, root, **opts):
        opened.append((kind, root, opts))
        return [_item(f"{kind}{k}", []) for k in range(10)]

    monkeypatch.setattr(dualloop.data, "open_dataset", open_dataset)

    def run(cfg_text, *args):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(cfg_text)
        return ev.main(["--checkpoint", str(tmp_path), "--config", str(cfg), "--device", "cpu", *args])

    return SimpleNamespace(run=run, opened=opened, tmp=tmp_path)


def test_cli_samples_zero_means_the_whole_split(cli):
    out = cli.tmp / "r.json"
    assert cli.run("data: {eval_datasets: [{name: s, kind: sa1b, root: /x}]}\neval: {samples: 4}\n",
                   "--samples", "0", "--json", str(out)) == 0
    assert json.loads(out.read_text())["cycle"]["samples"] == 10


def test_cli_training_specs_are_scored_on_eval_split(cli):
    # without data.eval_datasets the training specs (RefCOCO split: train) are used: eval.split must apply
    train_specs = "data: {datasets: [{name: r, kind: refcoco, root: /x, split: train}]}\n"
    assert cli.run(train_specs) == 0
    assert cli.opened[-1][2]["split"] == "val"
    assert cli.run(train_specs + "eval: {split: testB}\n") == 0
    assert cli.opened[-1][2]["split"] == "testB"
    # an eval spec's own split stays; --split overrides everything
    assert cli.run("data: {eval_datasets: [{name: r, kind: refcoco, root: /x, split: testA}]}\n") == 0
    assert cli.opened[-1][2]["split"] == "testA"
    assert cli.run(train_specs, "--split", "testA") == 0
    assert cli.opened[-1][2]["split"] == "testA"


def test_cli_rejects_duplicate_dataset_names(cli, capsys):
    # RefCOCO, RefCOCO+ and RefCOCOg all default to the name of their kind: one would silently replace another
    specs = "data: {eval_datasets: [{kind: refcoco, root: /x}, {kind: refcoco, root: /x, dataset: refcoco+}]}\n"
    assert cli.run(specs) == 2
    assert "refcoco" in capsys.readouterr().err


def test_cli_json_has_no_nan_without_captioned_datasets(cli):
    out = cli.tmp / "r.json"
    assert cli.run("data: {eval_datasets: [{name: s, kind: sa1b, root: /x}]}\n", "--json", str(out)) == 0

    def no_nan(c):
        raise AssertionError(f"{c} in the JSON report")

    result = json.loads(out.read_text(), parse_constant=no_nan)
    assert result["grounding"]["samples"] == 0 and result["grounding"]["ciou"] is None


def test_cli_empty_split_is_a_clean_error(tmp_path, monkeypatch, capsys):
    import dualloop.train.export
    from dualloop.data.synthetic import write_refcoco

    monkeypatch.setattr(dualloop.train.export, "load_trained_model", lambda ckpt, cfg: StubModel())
    write_refcoco(tmp_path / "rc", np.random.default_rng(0), 4, 32)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{eval_datasets: [{{name: r, kind: refcoco, root: {tmp_path / 'rc'}, split: val}}]}}\n")
    code = ev.main(["--checkpoint", str(tmp_path), "--config", str(cfg), "--device", "cpu", "--split", "testC"])
    assert code == 2
    assert "testC" in capsys.readouterr().err


def test_ranks_share_the_samples_and_merge_into_the_single_process_scores(monkeypatch):
    """With world_size ranks each scores every world_size-th sample; the merged meters are the one-process meters,
    sample for sample and in the same order (so gIoU is summed in the same order)."""
    import dualloop.distributed

    def item(k):  # a different target per sample: "hit" grounds everything, so the IoU is the target's coverage
        mask = np.zeros((8, 8), np.uint8)
        mask[: k % 8 + 1] = 1
        return _item(f"ref{k}", ["hit it", "miss: it"] if k % 3 else ["hit it"], mask)

    datasets = {"a": [item(k) for k in range(7)], "b": [item(k) for k in range(7, 12)]}
    one = ev.evaluate_model(StubModel(), datasets, samples=None, batch_size=2)
    parts = []
    for rank in range(3):  # every_rank would gather each rank's meters: here each rank sees only its own
        monkeypatch.setattr(dualloop.distributed, "every_rank", lambda obj: parts.append(obj) or [obj])
        ev.evaluate_model(StubModel(), datasets, samples=None, batch_size=2, rank=rank, world_size=3)
    assert [len(c.inter) for c, _, _ in parts] == [5, 4, 3]  # 12 samples dealt round-robin per dataset (7 + 5)
    cycle = IoUMeter.merged([c for c, _, _ in parts])
    grounding = IoUMeter.merged([g for _, g, _ in parts])
    assert cycle.summary() == one["cycle"] and grounding.summary() == one["grounding"]
    assert grounding.summary()["samples"] == 12 + 8  # samples 1, 2, 4, 5, 7, 8, 10, 11 have two sentences


def test_a_data_error_on_one_rank_fails_every_rank(monkeypatch):
    """A rank whose data fails still reaches the gather (no hang) and every rank raises, naming the failed rank."""
    import dualloop.distributed
    from dualloop.data import DataError

    class Broken(list):
        def __getitem__(self, i):
            if i == 1:
                raise DataError("too many unreadable samples in /data/x")
            return super().__getitem__(i)

    datasets = {"a": Broken(_item(f"r{k}", ["hit"]) for k in range(4))}
    gathered = []

    def every_rank(obj):  # rank 0 (this process) and a rank 1 that failed
        gathered.append(obj)
        return [obj, (IoUMeter(), IoUMeter(), "rank 1: too many unreadable samples in /data/x")]

    monkeypatch.setattr(dualloop.distributed, "every_rank", every_rank)
    with pytest.raises(DataError, match="rank 1: too many unreadable samples in /data/x"):
        ev.evaluate_model(StubModel(), datasets, samples=None, batch_size=1, rank=0, world_size=2)
    assert gathered[0][2] is None  # rank 0's own samples (0 and 2) were fine
    gathered.clear()
    with pytest.raises(DataError, match="rank 1: too many"):  # the failing rank itself also reaches the gather
        ev.evaluate_model(StubModel(), datasets, samples=None, batch_size=1, rank=1, world_size=2)
    assert "rank 1: too many unreadable samples" in gathered[0][2]


def test_eval_during_training_config_errors_come_before_training(tmp_path, capsys):
    from dualloop.config import ConfigError, load_config
    from dualloop.data.synthetic import write_refcoco
    from dualloop.train.trainer import main as train_main

    with pytest.raises(ConfigError, match="eval.every is set but the config lists no"):
        ev.TrainingEvaluator(load_config(None, ["eval.every=10"]))
    write_refcoco(tmp_path / "rc", np.random.default_rng(0), 4, 32)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{datasets: [{{name: r, kind: refcoco, root: {tmp_path / 'rc'}, split: train}}]}}\n")
    # the training specs are scored on eval.split: an unknown split is reported as a config error (exit 2)
    assert train_main(["--config", str(cfg), "eval.every=10", "eval.split=testC"]) == 2
    assert "eval.every" in capsys.readouterr().err
    assert train_main(["--config", str(cfg), "eval.every=-1"]) == 2
    assert "eval.every must be >= 0" in capsys.readouterr().err


def test_rank_share_deals_samples_round_robin_and_pads_for_lockstep():
    assert ev.rank_share(5, 0, 2) == ([0, 2, 4], 3)
    assert ev.rank_share(5, 1, 2) == ([1, 3], 2)
    assert ev.rank_share(5, 1, 2, lockstep=True) == ([1, 3, 3], 2)  # as many batches as rank 0, last one unscored
    assert ev.rank_share(1, 2, 4, lockstep=True) == ([0], 0)  # no sample of its own: the first, unscored
    assert ev.rank_share(0, 1, 2, lockstep=True) == ([], 0)  # an empty split: nothing to run anywhere


def test_cli_eval_spec_without_split_is_scored_on_eval_split(cli):
    # RefCOCODataset defaults to split="train": an eval spec that names no split must not score the training refs
    specs = "data: {eval_datasets: [{name: r, kind: refcoco, root: /x}, {name: s, kind: sa1b, root: /y}]}\n"
    assert cli.run(specs) == 0
    assert cli.opened[-2][2]["split"] == "val" and "split" not in cli.opened[-1][2]
    assert cli.run(specs + "eval: {split: testB}\n") == 0
    assert cli.opened[-2][2]["split"] == "testB"


def _refcoco_family(root, n_images=20):
    """A synthetic refcoco/ (refs(unc).p: train, val, testA, testB) and a refcocog/ beside it with RefCOCOg's umd
    split names (refs(umd).p: train, val, test), on the same images."""
    import pickle
    import shutil

    from dualloop.data.synthetic import write_refcoco

    write_refcoco(root, np.random.default_rng(0), n_images, 32)
    refs = pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    (root / "refcocog").mkdir()
    shutil.copy(root / "refcoco" / "instances.json", root / "refcocog" / "instances.json")
    umd = {"train": "train", "val": "val", "testA": "test", "testB": "test"}
    (root / "refcocog" / "refs(umd).p").write_bytes(pickle.dumps([dict(r, split=umd[r["split"]]) for r in refs]))
    return refs


def test_cli_scores_refcoco_and_refcocog_each_on_its_own_split(tmp_path, monkeypatch, capsys):
    import dualloop.train.export

    monkeypatch.setattr(dualloop.train.export, "load_trained_model", lambda ckpt, cfg: StubModel())
    refs = _refcoco_family(tmp_path / "rc")
    root = tmp_path / "rc"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{eval_datasets: [{{name: refcoco_testA, kind: refcoco, root: {root}, split: testA}}, "
                   f"{{name: refcocog_test, kind: refcoco, root: {root}, dataset: refcocog, split_by: umd, "
                   "split: test}]}\n")
    out = tmp_path / "r.json"
    args = ["--checkpoint", str(tmp_path), "--config", str(cfg), "--device", "cpu", "--samples", "0"]
    assert ev.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    sentences = {s: sum(len(r["sentences"]) for r in refs if r["split"] in s) for s in ("testA", "testAtestB")}
    per = result["grounding"]["per_dataset"]
    assert per["refcoco_testA"]["samples"] == sentences["testA"]  # every sentence of the split
    assert per["refcocog_test"]["samples"] == sentences["testAtestB"]
    assert result["splits"] == {"refcoco_testA": "testA", "refcocog_test": "test"}
    capsys.readouterr()
    # RefCOCOg has no testA: the error names the file and the splits it has
    assert ev.main([*args, "--split", "testA"]) == 2
    err = capsys.readouterr().err
    assert "refs(umd).p has no split 'testA'" in err and "test, train, val" in err


def test_cli_does_not_replace_an_unreadable_sample(tmp_path, monkeypatch, capsys):
    """A reader replaces a bad sample by another one (under max_bad_fraction, 1%): right for training, but a
    reported figure would then score another ref twice instead of that one. `dualloop eval` stops instead, unless
    the spec allows bad samples itself."""
    import dualloop.train.export

    monkeypatch.setattr(dualloop.train.export, "load_trained_model", lambda ckpt, cfg: StubModel())
    refs = _refcoco_family(tmp_path / "rc", n_images=150)
    train = [r for r in refs if r["split"] == "train"]
    assert len(train) > 100  # one bad ref is under 1% of the split
    bad = tmp_path / "rc" / "images" / f"COCO_train2014_{train[0]['image_id']:012d}.jpg"
    bad.write_bytes(b"not a jpeg")
    cfg = tmp_path / "c.yaml"
    spec = f"{{name: r, kind: refcoco, root: {tmp_path / 'rc'}, split: train"
    cfg.write_text(f"data: {{eval_datasets: [{spec}}}]}}\neval: {{batch_size: 16}}\n")
    args = ["--checkpoint", str(tmp_path), "--config", str(cfg), "--device", "cpu", "--samples", "0"]
    assert ev.main(args) == 2
    assert bad.name in capsys.readouterr().err
    cfg.write_text(f"data: {{eval_datasets: [{spec}, max_bad_fraction: 0.01}}]}}\neval: {{batch_size: 16}}\n")
    assert ev.main(args) == 0  # allowed by the spec


def test_cli_rejects_negative_samples(cli, capsys):
    assert cli.run("data: {eval_datasets: [{name: s, kind: sa1b, root: /x}]}\n", "--samples", "-1") == 2
    assert "--samples" in capsys.readouterr().err


def test_cli_eval_spec_without_kind_is_a_clear_error(cli, capsys):
    assert cli.run("data: {eval_datasets: [{name: s, root: /x}]}\n") == 2
    assert "lacks ['kind']" in capsys.readouterr().err


def test_cli_conventions_named_on_the_command_line_win_over_the_checkpoints(cli, monkeypatch, capsys):
    import dualloop.train.export

    seen = []

    class Recording(StubModel):
        model_cfg = SimpleNamespace(max_tiles=12, object_gate=False)

        def use_conventions(self, **settings):
            seen.append(settings)

    monkeypatch.setattr(dualloop.train.export, "load_trained_model", lambda ckpt, cfg: Recording())
    spec = "data: {eval_datasets: [{name: s, kind: sa1b, root: /x}]}\n"
    assert cli.run(spec, "model.max_tiles=1", "model.object_gate=true", "eval.samples=2") == 0
    assert seen == [{"max_tiles": 1, "object_gate": True}]
    out = cli.tmp / "r.json"
    assert cli.run(spec, "model.max_tiles=1", "eval.samples=2", "--json", str(out)) == 0
    assert json.loads(out.read_text())["conventions"] == {"max_tiles": 12, "object_gate": False}  # the stub's
    seen.clear()
    assert "instead of the checkpoint's {'max_tiles': 12, 'object_gate': False}" in capsys.readouterr().err
    assert cli.run(spec, "eval.samples=2") == 0 and not seen  # nothing named: the checkpoint's own


def test_use_conventions_changes_how_the_model_reads_inputs_not_its_weights():
    from dualloop.config import LoraConfig, ModelConfig
    from dualloop.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", lora=LoraConfig(enabled=False)))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    wide = torch.zeros(3, 64, 200, dtype=torch.uint8)
    assert model.tiles_of([wide]) == [1]
    model.use_conventions(max_tiles=6, prompt_style="sa2va", object_gate=True)
    assert model.tiles_of([wide]) == [4] and model.model_cfg.object_gate  # 3x1 tiles + the thumbnail
    assert "there are 1 part regions" in model.tokenizer.decode(model.prompts.caption_prompts([1]).ids[0])
    with pytest.raises(ValueError, match="model.sam2_resize"):
        model.use_conventions(sam2_resize="lanczos")
    assert model.sam2_resize == "bilinear" and model.max_tiles == 6  # unchanged by the refused call
    with pytest.raises(ValueError, match="not model conventions: lora"):
        model.use_conventions(lora=None)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
