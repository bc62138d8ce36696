"""The training loop as a user of DeepSpeed + HF training tools expects it: `train.log_every` lines average the
steps since the previous line (HF Trainer's logged loss is the mean since the last log) and every step lands in
one line (at a checkpoint, a stop and the end too, so a resumed run writes the lines of an uninterrupted one); a bad
log_every is a config error before any model work; a fresh run in a used output_dir hides the old run's TensorBoard
curves; the schedule's relation to transformers' cosine schedule; and one real run (tiny, ZeRO-3, CPU, 2 accumulated
micro-batches): sample counts over the whole accumulation window, one clipping per optimizer step on the
accumulated gradient, the logged grad norm the one clipping used."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from test_optim_setup import run_worker  # a single-process training worker in a clean environment

from dualloop.config import Config, ConfigError
from dualloop.train.metrics import MetricsWriter, StepMetrics

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- Trainer.fit, no model
def _fake_trainer(tmp_path: Path, *, steps: int, log_every: int, save_every: int, start_step: int = 0,
                  stop_at: int | None = None, die_at: int | None = None):
    """A Trainer whose train_step returns made-up records (2 samples a step; caption_loss on one of them) and
    whose checkpoints are only remembered: Trainer.fit's own logging, saving and stopping, in milliseconds."""
    from dualloop.train.trainer import Trainer

    cfg = Config()
    t = cfg.train
    t.steps, t.log_every, t.save_every, t.progress_bar, t.tensorboard = steps, log_every, save_every, False, False
    tr = object.__new__(Trainer)
    tr.cfg, tr.rank, tr.world, tr.device, tr.evaluator = cfg, 0, 1, torch.device("cpu"), None
    tr.out_dir, tr.start_step, tr.samples_seen = tmp_path, start_step, 2 * start_step
    tr.skipped_total = tr.consecutive_skips = 0
    tr.last_checkpoint, tr.saved = None, []
    tr.writer = MetricsWriter(tmp_path, tensorboard=False, resume_step=start_step if start_step else None)
    tr.close_data = lambda: None

    def save(step):
        tr.saved.append(step)
        tr.last_checkpoint = tmp_path / f"step_{step}"

    tr._save = save
    def train_step(step):
        if step == die_at:
            raise KeyboardInterrupt("killed")  # a crash mid-run: no save, no flush
        m = StepMetrics(["sav"], tr.device)
        m.add(["sav", "sav"], {"loss": torch.tensor([step, 2.0 * step]), "caption_loss": torch.tensor([1.0, step])},
              {"caption_loss": torch.tensor([False, True])})
        record = m.reduce()
        tr.step_metrics = m
        tr.samples_seen += 2
        record.update({"step": step + 1, "lr": 0.1 * (step + 1), "skipped": False, "skipped_total": 0,
                       "samples_seen": tr.samples_seen, "samples_per_s": 2 / (step + 1.0), "step_time_s": step + 1.0,
                       "grad_norm": 10.0 + step, "peak_memory_mb": 100.0 - step, "time_data_s": 0.5 * step})
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return record

    tr.train_step = train_step
    return tr


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_log_lines_average_the_steps_since_the_previous_line_and_every_step_is_logged(tmp_path):
    """log_every=3: a line reported one step's values, the other two steps' were never written (a noisy loss curve
    from a third of the data), and the steps after the last multiple of 3 (before a checkpoint, at the end) had no
    line at all. Now a line averages its steps (sample-weighted, like the step's own micro-batches), and lines
    come at every log_every-th step, at each checkpoint and at the end."""
    tr = _fake_trainer(tmp_path, steps=7, log_every=3, save_every=5)
    tr.fit()
    assert tr.saved == [5, 7]
    lines = _lines(tmp_path)
    assert [x["step"] for x in lines] == [3, 5, 6, 7]
    first = lines[0]  # steps 1..3 (step indices 0, 1, 2): losses (0, 0), (1, 2), (2, 4)
    assert first["loss"] == pytest.approx(9 / 6) and first["per_dataset"]["sav"]["samples"] == 6
    assert first["caption_loss"] == pytest.approx((0 + 1 + 2) / 3)  # only the samples that have one
    assert first["step_time_s"] == pytest.approx(2.0) and first["time_data_s"] == pytest.approx(0.5)
    assert first["samples_per_s"] == pytest.approx(6 / 6.0)  # all samples over all the time
    assert first["peak_memory_mb"] == 100.0  # the window's peak
    assert (first["lr"], first["grad_norm"], first["samples_seen"]) == (pytest.approx(0.3), 12.0, 6)  # last step's
    assert lines[1]["loss"] == pytest.approx((3 + 6 + 4 + 8) / 4)  # steps 4, 5: flushed at the checkpoint
    assert lines[3]["loss"] == pytest.approx((6 + 12) / 2)  # step 7 alone, at the end


def test_log_every_one_lines_are_the_step_records_unchanged(tmp_path):
    tr = _fake_trainer(tmp_path, steps=3, log_every=1, save_every=100)
    records = []
    inner = tr.train_step
    tr.train_step = lambda step: records.append(inner(step)) or records[-1]
    tr.fit()
    assert _lines(tmp_path) == json.loads(json.dumps(records))


def test_a_resumed_run_writes_the_lines_of_the_uninterrupted_one(tmp_path):
    """Killed after the checkpoint of step 5 (in the middle of a logging window), resumed there: the same lines as
    without the kill, none twice, none missing, the same averages."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    _fake_trainer(ref, steps=8, log_every=3, save_every=5).fit()
    with pytest.raises(KeyboardInterrupt):
        _fake_trainer(cut, steps=8, log_every=3, save_every=5, die_at=6).fit()
    _fake_trainer(cut, steps=8, log_every=3, save_every=5, start_step=5).fit()
    assert _lines(cut) == _lines(ref)
    assert [x["step"] for x in _lines(ref)] == [3, 5, 6, 8]


def test_a_stop_signal_writes_the_pending_line_with_its_checkpoint(tmp_path):
    from dualloop.train.stop import TrainingStopped

    tr = _fake_trainer(tmp_path, steps=10, log_every=3, save_every=100, stop_at=3)
    with pytest.raises(TrainingStopped):
        tr.fit()
    assert tr.saved == [4] and [x["step"] for x in _lines(tmp_path)] == [3, 4]


def test_the_summary_counts_the_steps_run_and_a_run_with_nothing_left_says_so(tmp_path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    summary = _fake_trainer(tmp_path / "a", steps=5, log_every=1, save_every=10, start_step=2).fit()
    assert (summary["steps_run"], summary["loss_first"], summary["loss_last"]) == (3, 3.0, 6.0)
    assert summary["samples_per_s"] > 0
    idle = _fake_trainer(tmp_path / "b", steps=4, log_every=1, save_every=10, start_step=4).fit()
    assert idle["steps_run"] == 0 and idle["loss_first"] is None
    assert "nothing to train: resumed at step 4, train.steps is 4" in capsys.readouterr().err


def test_log_every_below_one_is_a_config_error_before_any_model_work(corpus, tmp_path, monkeypatch):
    """train.log_every=0 divided by zero after the first step, once the model, the engine and the data had been set
    up (minutes on a real model); it is checked with the other settings at the start."""
    import dualloop.train.trainer as trainer_mod
    from dualloop.config import load_config

    def too_far(*a, **k):
        raise AssertionError("got past the config checks")

    monkeypatch.setattr(trainer_mod, "load_ds_config", too_far)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {**corpus, "num_workers": 0}, "model": {"preset": "tiny"},
                                    "train": {"output_dir": str(tmp_path / "run"), "log_every": 0}}))
    with pytest.raises(ConfigError, match="train.log_every must be >= 1"):
        trainer_mod.Trainer(load_config(path))


# ------------------------------------------------------------------------------------------------------ TensorBoard
def test_a_fresh_run_hides_the_tensorboard_curves_of_an_earlier_run_in_its_output_dir(tmp_path):
    """train.resume=none (or a run that died before its first checkpoint, rerun) starts over in the same
    output_dir: metrics.jsonl starts anew, but TensorBoard plotted the old run's steps and the new run's on one
    curve, two values at each step. The new run's writer purges them from step 1, as a resume does after its
    checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, tensorboard=True, resume_step=None)
    for step in range(1, 7):
        w.write({"step": step, "loss": float(step)})
    w.close()
    w = MetricsWriter(tmp_path, tensorboard=True, resume_step=None)
    for step in range(1, 4):
        w.write({"step": step, "loss": 10.0 * step})
    w.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 10.0), (2, 20.0), (3, 30.0)]


# ------------------------------------------------------------------------------------------------------ schedule
def test_the_schedule_is_transformers_cosine_with_min_lr_one_step_ahead_in_warmup():
    """After warmup, warmup_cosine is transformers' get_cosine_with_min_lr_schedule_with_warmup step for step (to
    the last step, which trains above the floor, as there). In warmup it is one step ahead: step k trains with
    lr (k+1)/warmup, not k/warmup, so the first step's lr is lr/warmup, not 0 (documented in the README: "from
    lr/warmup"). Without warmup the two are equal from step 0."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from dualloop.train.engine import warmup_cosine

    for steps, ratio, floor in ((10, 0.3, 0.1), (7, 0.0, 0.0), (5, 1.0, 0.0)):
        warmup = math.ceil(ratio * steps)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        hf = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps, min_lr_rate=floor)
        ref = hf.lr_lambdas[0]
        ours = [warmup_cosine(s, total=steps, warmup=warmup, min_ratio=floor) for s in range(steps)]
        for s in range(steps):
            expected = ref(s + 1) if s < warmup else ref(s)
            assert ours[s] == pytest.approx(expected, abs=1e-12), (steps, ratio, s)
        assert ours[-1] > floor or warmup == steps


# ------------------------------------------------------------------------------------------------------ a real run
WORKER = r'''
import json, sys
import torch
from dualloop.config import load_config
from dualloop.train.trainer import Trainer

tr = Trainer(load_config(sys.argv[1]))
opt = tr.engine.optimizer
clips = []
inner = opt.unscale_and_clip_grads
def spy(sub_group_id, total_norm):
    inner(sub_group_id, total_norm)
    clips.append({"micro_steps": tr.engine.micro_steps, "norm": float(total_norm), "scale": float(opt.loss_scale),
                  "after": float(opt.fp32_partitioned_groups_flat[sub_group_id].grad.norm())})
opt.unscale_and_clip_grads = spy
records = []
step_fn = tr.train_step
tr.train_step = lambda step: records.append(step_fn(step)) or records[-1]
summary = tr.fit()
print("RESULT " + json.dumps({"records": records, "clips": clips, "micro_steps": tr.engine.micro_steps,
                              "global_steps": tr.engine.global_steps}))
'''


@pytest.fixture(scope="module")
def real_run(corpus, tmp_path_factory) -> dict:
    """3 optimizer steps of 2 micro-batches of 1 (ZeRO-3, fp32, CPU), logged every 2 steps, clipping at 1e-3."""
    tmp = tmp_path_factory.mktemp("audit")
    data = {k: v for k, v in corpus.items() if k != "eval_datasets"}
    cfg = {"model": {"preset": "tiny"}, "data": {**data, "num_workers": 0},
           "loop": {"caption": {"max_new_tokens": 2}, "loss": {"backend": "torch"}},
           "train": {"output_dir": str(tmp / "run"), "steps": 3, "micro_batch_size": 1, "grad_accum": 2,
                     "log_every": 2, "grad_clip": 1e-3, "lr": 1e-3, "warmup_ratio": 0.0, "save_every": 100,
                     "ds_config": "zero3_bf16", "progress_bar": False, "tensorboard": False}}
    return {**run_worker(tmp, cfg, WORKER), "lines": _lines(tmp / "run")}


def test_real_run_logs_window_averages_over_every_micro_batch(real_run):
    records, lines = real_run["records"], real_run["lines"]
    assert [r["per_dataset"] and sum(d["samples"] for d in r["per_dataset"].values()) for r in records] == [2, 2, 2]
    assert real_run["micro_steps"] == 6 and real_run["global_steps"] == 3  # train.steps counts optimizer steps
    assert [x["step"] for x in lines] == [2, 3]  # step 3: the end, not a multiple of log_every
    assert sum(d["samples"] for d in lines[0]["per_dataset"].values()) == 4
    assert lines[0]["loss"] == pytest.approx((records[0]["loss"] + records[1]["loss"]) / 2, rel=1e-9)
    assert lines[1]["loss"] == pytest.approx(records[2]["loss"], rel=1e-12)
    assert [r["samples_seen"] for r in records] == [2, 4, 6]


def test_real_run_clips_the_accumulated_gradient_once_per_step_and_logs_its_norm(real_run):
    clips, records = real_run["clips"], real_run["records"]
    by_step: dict[int, list[dict]] = {}
    for c in clips:  # one call per ZeRO-3 sub-group (here the decayed and the undecayed parameters)
        by_step.setdefault(c["micro_steps"], []).append(c)
    # once per optimizer step, at the accumulation boundary (DeepSpeed counts the micro-step after the update)
    assert sorted(by_step) == [1, 3, 5]
    for (_, calls), r in zip(sorted(by_step.items()), records):
        assert len({c["norm"] for c in calls}) == 1  # one global norm over every sub-group
        norm = calls[0]["norm"] / calls[0]["scale"]
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-9)  # DeepSpeed's pre-clip norm is the one logged
        after = math.sqrt(sum(c["after"] ** 2 for c in calls))
        assert norm > 1e-3 and after == pytest.approx(1e-3, rel=1e-3)  # the whole gradient clipped to grad_clip
