"""Evaluation metrics, `dualloop demo` end to end (a few steps) and `dualloop eval` on its checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dualloop.eval.metrics import IoUMeter, intersection_union, predict_mask


def test_ciou_giou_conventions():
    m = IoUMeter()
    m.add(90, 100, "big")  # IoU 0.9
    m.add(0, 10, "small")  # IoU 0.0
    s = m.summary()
    assert s["ciou"] == pytest.approx(90 / 110)  # cumulative: dominated by the large object
    assert s["giou"] == pytest.approx(0.45)  # mean of per-sample IoU
    assert s["per_dataset"]["big"]["giou"] == pytest.approx(0.9)
    assert s["per_dataset"]["small"]["samples"] == 1


def test_predict_mask_upsamples_logits_at_target_size():
    logits = torch.full((4, 4), -5.0)
    logits[:2, :2] = 5.0
    pred = predict_mask(logits, (8, 8))
    assert pred.shape == (8, 8) and pred[:3, :3].all() and not pred[5:, 5:].any()
    target = torch.zeros(8, 8, dtype=torch.uint8)
    target[:4, :4] = 1
    inter, union = intersection_union(pred, target)
    assert inter == int(pred[:4, :4].sum()) and union == int((pred | target.bool()).sum())
    with pytest.raises(ValueError, match="differ in size"):
        intersection_union(pred, target[:4])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    # A subprocess, as a user runs it: the trainer initializes torch.distributed and DeepSpeed's global ZeRO-3
    # state, which must not leak into the other tests of this session.
    out = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "dualloop.cli", "demo", "--steps", "2", "--out", str(out),
                           "eval.samples=2", "eval.batch_size=2"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cycle IoU" in proc.stdout
    return out, json.loads((out / "summary.json").read_text())


def test_demo_writes_everything(demo_run):
    out, summary = demo_run
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("steps", "mode", "device", "seconds", "samples_per_s", "loss_first", "loss_last", "cycle_iou_before",
                "cycle_iou_after", "grounding_iou_before", "grounding_iou_after"):
        assert key in on_disk, key
    assert on_disk["steps"] == 2 and on_disk["mode"] == "none"
    assert 0.0 <= on_disk["cycle_iou_after"] <= 1.0 and 0.0 <= on_disk["grounding_iou_before"] <= 1.0
    assert torch.isfinite(torch.tensor(on_disk["loss_last"]))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "loss.png").stat().st_size > 1000 and (out / "examples.png").stat().st_size > 1000
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard events"
    assert (out / "checkpoints" / "latest").is_file()


def test_eval_cli_on_demo_checkpoint(demo_run, tmp_path, capsys):
    from dualloop.cli import main

    out, _ = demo_run
    report = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(out), "--config", str(out / "config.yaml"), "--json", str(report),
                 "--samples", "2", "--split", "val", "--device", "cpu"])
    assert code == 0
    result = json.loads(report.read_text())
    assert set(result) >= {"cycle", "grounding"}
    assert set(result["cycle"]["per_dataset"]) == {"sav_val", "sa1b_val", "openimages_val", "refcoco_val"}
    # only datasets with ground-truth captions are scored for referring segmentation
    assert set(result["grounding"]["per_dataset"]) == {"openimages_val", "refcoco_val"}
    for s in result["cycle"]["per_dataset"].values():
        assert s["samples"] == 2 and 0.0 <= s["ciou"] <= 1.0 and 0.0 <= s["giou"] <= 1.0
    assert "cIoU" in capsys.readouterr().out
    # a --json that cannot be written: the table is still printed, and the error names the file (exit 2)
    missing = tmp_path / "no" / "such" / "dir" / "eval.json"
    code = main(["eval", "--checkpoint", str(out), "--config", str(out / "config.yaml"), "--json", str(missing),
                 "--samples", "1", "--split", "val", "--device", "cpu"])
    said = capsys.readouterr()
    assert code == 2 and "cIoU" in said.out and f"--json {missing}" in said.err


def test_eval_with_graph_ready_decoding_gives_the_same_results(demo_run):
    """`dualloop eval` captions with loop.caption.cuda_graph (its model is plain, weights in place): on the CPU the
    static-cache steps, which must score exactly as the dynamic cache does."""
    from dualloop.config import load_config
    from dualloop.eval.evaluate import evaluate_model, open_eval_datasets
    from dualloop.train.export import load_trained_model

    out, _ = demo_run
    cfg = load_config(out / "config.yaml")
    model = load_trained_model(out, cfg)
    datasets = open_eval_datasets(cfg.data.eval_datasets or cfg.data.datasets, "val")
    kw = dict(samples=3, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.loop.caption.max_new_tokens)
    dynamic = evaluate_model(model, datasets, **kw)
    assert model.last_decoding == "dynamic"
    static = evaluate_model(model, datasets, cuda_graph=True, **kw)
    assert model.last_decoding == "static"
    for key in ("cycle", "grounding"):
        assert static[key] == dynamic[key]


def test_eval_cli_rejects_missing_checkpoint(tmp_path, capsys):
    from dualloop.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {datasets: [{name: x, kind: sa1b, root: /nonexistent}]}\n")
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--config", str(cfg)]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("device,says", [("tpu", "--device tpu"), ("cuda:0", "no CUDA device")])
def test_eval_cli_rejects_unusable_device(demo_run, device, says, capsys, monkeypatch):
    import torch

    from dualloop.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out, _ = demo_run
    assert main(["eval", "--checkpoint", str(out), "--config", str(out / "config.yaml"), "--device", device]) == 2
    assert says in capsys.readouterr().err


def test_eval_grounds_cycle_and_ground_truth_in_one_call(demo_run, monkeypatch):
    """evaluate_model grounds the cycle's captions (image2) and the ground-truth captions (image1) in one call, in
    which a single-image sample's image goes through SAM2's encoder once, and runs the VLM tower once per batch
    for captioning and grounding: each meter gets the logits of separate calls, with the right targets."""
    from dualloop.config import load_config
    from dualloop.data import collate_samples
    from dualloop.eval.evaluate import eval_indices, evaluate_model, open_eval_datasets
    from dualloop.eval.metrics import IoUMeter
    from dualloop.train.export import load_trained_model

    out, _ = demo_run
    cfg = load_config(out / "config.yaml")
    model = load_trained_model(out, cfg)
    model.eval()
    datasets = open_eval_datasets(cfg.data.eval_datasets or cfg.data.datasets, "val")
    kw = dict(samples=3, batch_size=3, max_new_tokens=cfg.loop.caption.max_new_tokens)
    scored, encoded, towered = [], [], []  # (logits, targets) as the meters get them; SAM2, tower batch sizes
    add = IoUMeter.add_logits
    monkeypatch.setattr(IoUMeter, "add_logits",
                        lambda self, logits, targets, names, keys=None: scored.append((logits, targets)) or add(
                            self, logits, targets, names, keys))
    hooks = [model.sam2.vision_encoder.register_forward_hook(lambda m, a, o: encoded.append(a[0].shape[0])),
             model.vlm.model.vision_tower.register_forward_hook(
                 lambda m, a, k, o: towered.append(k["pixel_values"].shape[0]), with_kwargs=True)]
    try:
        evaluate_model(model, datasets, **kw)
    finally:
        for h in hooks:
            h.remove()
    expected, expected_encoded, expected_towered, separately = [], [], [], 0
    with torch.no_grad():  # the two separate calls, as before
        for ds in datasets.values():
            batch = collate_samples([ds[i] for i in eval_indices(len(ds), 3)])
            cap = model.caption(batch["image1"], batch["mask1"], max_new_tokens=kw["max_new_tokens"])
            expected.append((model.ground(batch["image2"], caption_ids=cap.ids, caption_lengths=cap.lengths).logits,
                             batch["mask2"]))
            with_gt = [j for j, caps in enumerate(batch["captions"]) for _ in caps]  # one sample per caption
            expected_encoded.append(len({id(x) for x in batch["image2"]} | {id(batch["image1"][j]) for j in with_gt}))
            expected_towered.append(len({id(x) for x in [*batch["image1"], *batch["image2"]]}))
            separately += len(batch["image2"]) + len(with_gt)
            if with_gt:
                ids, lengths = model.encode_captions([c for caps in batch["captions"] for c in caps])
                g = model.ground([batch["image1"][j] for j in with_gt], caption_ids=ids, caption_lengths=lengths)
                expected.append((g.logits, [batch["mask1"][j] for j in with_gt]))
    assert len(scored) == len(expected)
    for (logits, targets), (ref_logits, ref_targets) in zip(scored, expected):
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert len(targets) == len(ref_targets) and all(torch.equal(a, b) for a, b in zip(targets, ref_targets))
    # one encoder call per batch, on its distinct images: fewer than the two calls' images in all; the VLM tower
    # once per batch too, for the caption and the grounding (it was three times: caption, cycle, ground truth)
    assert encoded == expected_encoded and sum(encoded) < separately
    assert towered == expected_towered


@pytest.mark.slow
def test_eval_on_two_ranks_scores_like_one_process(demo_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m dualloop.eval` (gloo on the CPU): the ranks share the samples and rank 0
    reports exactly the one-process figures. Batch size 1, so that both runs decode every sample alone."""
    from test_train_dist import torchrun

    from dualloop.cli import main

    out, _ = demo_run
    args = ["--checkpoint", str(out), "--config", str(out / "config.yaml"), "--samples", "3", "--split", "val",
            "--device", "cpu", "eval.batch_size=1"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["eval", *args, "--json", str(one)]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", DUALLOOP_TMPDIR=str(tmp_path))
    proc = subprocess.run(torchrun("-m", "dualloop.eval", *args, "--json", two),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, shared = json.loads(one.read_text()), json.loads(two.read_text())
    assert shared["world_size"] == 2 and single["world_size"] == 1
    for key in ("cycle", "grounding"):
        assert shared[key] == single[key]
    assert shared["cycle"]["samples"] == 4 * 3
    assert proc.stdout.count("cIoU") == 1  # one table: rank 0's
    # the training checkpoint was consolidated once, by the node's local rank 0, and its temporary copy removed
    assert proc.stderr.count("consolidated once on") == 1, proc.stderr[-3000:]
    assert not list(tmp_path.glob("dualloop-eval-*"))

    # eval.answer=generated: each rank generates its own samples' replies; the no-[SEG] counts merge as the scores
    # (this demo model replies without [SEG] to most prompts: the scripted replies of test_generated_answer.py
    # check the masks)
    generated = [*args, "eval.answer=generated", "loop.caption.max_new_tokens=3"]
    assert main(["eval", *generated, "--json", str(one)]) == 0
    proc = subprocess.run(torchrun("-m", "dualloop.eval", *generated, "--json", two),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, shared = json.loads(one.read_text()), json.loads(two.read_text())
    assert shared["answer"] == single["answer"] == "generated"
    for key in ("cycle", "grounding"):
        assert shared[key] == single[key] and "no_seg" in shared[key]

    # the leader cannot write its copy: both ranks stop with that error (exit 2), none waits for the other
    env["DUALLOOP_TMPDIR"] = str(tmp_path / "missing" / "dir")
    proc = subprocess.run(torchrun("-m", "dualloop.eval", *args), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("consolidating") >= 2, proc.stderr[-3000:]
    assert "DUALLOOP_TMPDIR" in proc.stderr
