"""Resuming and failing safely: which checkpoint `train.resume: auto` picks when the pointer is gone or bad, a step
saved again not vouched for by its old COMPLETE marker, the data position after the mixture changed, and ranks that
see different output directories (node-local disks) stopping at start-up with a message instead of hanging; an
unwritable output dir found at start-up, keep_last counting complete checkpoints only, TensorBoard keeping the
checkpoint's step after a resume, a new lr / schedule length / batch split applying on resume, and a write failing
on one rank half-way through a save stopping every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from process_tree import kill_tree, output_after_kill
from test_train_dist import _env, torchrun  # the 2-rank workers' environment and launcher

from dualloop.config import ConfigError, load_config
from dualloop.train import checkpoint as ckpt_io

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def _complete(root: Path, step: int) -> Path:
    d = root / ckpt_io.tag_for(step)
    d.mkdir(parents=True)
    (d / ckpt_io.COMPLETE).write_text(str(step))
    return d


def test_resume_auto_without_latest_pointer_takes_the_newest_complete_checkpoint(tmp_path):
    """A missing `latest` (deleted, or step dirs copied without it) must not silently start the run over."""
    root = ckpt_io.checkpoint_root(tmp_path)
    _complete(root, 2)
    newest = _complete(root, 4)
    (root / ckpt_io.tag_for(6)).mkdir()  # killed mid-save: no COMPLETE
    assert ckpt_io.resolve_resume("auto", tmp_path) == newest
    assert ckpt_io.resolve_resume("auto", tmp_path / "fresh") is None  # nothing there: a new run


def test_export_and_eval_name_their_checkpoint_flag_and_find_runs_without_latest(tmp_path):
    """export/eval take the directory as --checkpoint: their errors say so (not train.resume), and a run dir whose
    `latest` is gone still gives its newest complete checkpoint."""
    from dualloop.train.export import main as export_main

    with pytest.raises(ConfigError, match="--checkpoint") as e:
        ckpt_io.resolve_resume(str(tmp_path / "nothing"), tmp_path / "nothing", "--checkpoint")
    assert "train.resume" not in str(e.value)
    root = ckpt_io.checkpoint_root(tmp_path / "run")
    _complete(root, 2)
    newest = _complete(root, 4)
    assert ckpt_io.resolve_resume(str(tmp_path / "run"), tmp_path, "--checkpoint") == newest
    assert ckpt_io.resolve_resume(str(root), tmp_path, "--checkpoint") == newest
    (root / ckpt_io.LATEST).write_text("garbage")
    with pytest.raises(ConfigError, match=f"--checkpoint {newest}"):
        ckpt_io.resolve_resume(str(tmp_path / "run"), tmp_path, "--checkpoint")
    assert export_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("pointer", ["", "garbage\n", "../../elsewhere", "step_00000006"])
def test_a_bad_latest_pointer_is_a_clear_error_naming_the_newest_complete(tmp_path, pointer):
    root = ckpt_io.checkpoint_root(tmp_path)
    newest = _complete(root, 4)
    (root / ckpt_io.LATEST).write_text(pointer)
    with pytest.raises(ConfigError, match="latest") as e:
        ckpt_io.resolve_resume("auto", tmp_path)
    assert f"train.resume={newest}" in str(e.value)


def test_saving_a_step_again_withdraws_its_old_complete_marker(tmp_path):
    """A resumed or rolled-back run overwrites an existing step directory in place: killed half-way, the old
    COMPLETE must not vouch for a mix of old and new shards."""

    class DyingEngine:
        def save_checkpoint(self, root, tag, save_latest):
            with open(os.path.join(root, tag, "zero_pp_rank_0_mp_rank_00_model_states.pt"), "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt  # killed mid-save

    cfg = load_config(REPO / "configs" / "test_1gpu.yaml")
    root = ckpt_io.checkpoint_root(tmp_path)
    _complete(root, 4)
    ckpt_io.write_atomic(root / ckpt_io.LATEST, ckpt_io.tag_for(4))
    old = _complete(root, 6)  # the step was saved before (e.g. by the trajectory a rollback abandoned)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save(DyingEngine(), tmp_path, 6, {"step": 6}, cfg)
    assert not (old / ckpt_io.COMPLETE).exists()
    (root / ckpt_io.LATEST).unlink()
    assert ckpt_io.resolve_resume("auto", tmp_path) == root / ckpt_io.tag_for(4)


def test_a_step_whose_old_marker_cannot_be_withdrawn_is_not_overwritten(tmp_path, monkeypatch):
    """Saving a step again starts by withdrawing its old COMPLETE marker (rank 0). When that fails, no rank may
    write a shard over the old checkpoint, which its marker still vouches for: every rank stops before writing."""
    import errno

    def read_only(ckpt):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(ckpt / ckpt_io.COMPLETE))

    monkeypatch.setattr(ckpt_io, "_withdraw", read_only)
    cfg = load_config(REPO / "configs" / "test_1gpu.yaml")
    root = ckpt_io.checkpoint_root(tmp_path)
    old = _complete(root, 6)
    with pytest.raises(ckpt_io.CheckpointWriteFailed, match="Read-only file system") as e:
        ckpt_io.save(_FakeEngine(), tmp_path, 6, {"step": 6}, cfg)
    assert "rank 0 failed withdrawing" in str(e.value) and "Nothing was written" in str(e.value)
    assert f"{old.name} is intact" in str(e.value)
    assert (old / ckpt_io.COMPLETE).is_file() and [p.name for p in old.iterdir()] == [ckpt_io.COMPLETE]


def test_a_save_failing_on_many_ranks_names_the_first_and_the_checkpoint_to_resume_from(tmp_path, monkeypatch):
    """Every rank of a full disk fails: the message stays readable. When `latest` names the failed step (a step saved
    again), train.resume=auto would not find a checkpoint: the message names the one to resume from."""
    root = ckpt_io.checkpoint_root(tmp_path)
    older = _complete(root, 4)
    failed = root / ckpt_io.tag_for(6)
    failed.mkdir()
    (failed / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")
    (root / ckpt_io.LATEST).write_text(failed.name)
    monkeypatch.setattr(ckpt_io, "every_rank", lambda error: [f"writing shard {r}: OSError: full" for r in range(8)])
    writes = ckpt_io._Writes()
    with pytest.raises(ckpt_io.CheckpointWriteFailed) as e:
        ckpt_io._agree(writes, failed)
    message = str(e.value)
    assert "rank 2 failed writing shard 2" in message and "rank 3 failed" not in message, message
    assert "ranks 3, 4, 5, 6, 7 failed too" in message, message
    assert f"{older.name} is intact" in message and f"train.resume={older}" in message, message
    assert not failed.exists() and (older / ckpt_io.COMPLETE).is_file()


def test_tensorboard_keeps_the_checkpoint_step_after_a_resume(tmp_path):
    """TensorBoard drops events at steps >= purge_step. A run resumed from the checkpoint of step 4 redoes steps 5..,
    not 4: purging from 4 lost step 4's scalars (kept in metrics.jsonl) for good."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dualloop.train.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=True, resume_step=None)
    for step in range(1, 7):  # killed after step 6; the last checkpoint is that of step 4
        w.write({"step": step, "loss": float(step)})
    w.close()
    w = MetricsWriter(tmp_path, tensorboard=True, resume_step=4)
    for step in (5, 6):
        w.write({"step": step, "loss": 10.0 * step})
    w.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == expected
    assert [(x["step"], x["loss"]) for x in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] \
        == expected


class _FakeEngine:
    def save_checkpoint(self, root, tag, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "zero_pp_rank_0_mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"weights")


def test_pruning_keeps_the_newest_complete_checkpoints_and_clears_dead_saves(tmp_path):
    """train.keep_last counts complete checkpoints: the remains of a save killed half-way (a later step, left after
    a resume with another save_every) pushed a complete one out, and were never removed themselves."""
    cfg = load_config(REPO / "configs" / "test_1gpu.yaml")
    root = ckpt_io.checkpoint_root(tmp_path)
    for step in (2, 4):
        ckpt_io.save(_FakeEngine(), tmp_path, step, {"step": step}, cfg, keep_last=2)
    (root / ckpt_io.tag_for(6)).mkdir()  # killed mid-save; resumed from step 4 with save_every=1
    (root / ckpt_io.tag_for(6) / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half")
    ckpt_io.save(_FakeEngine(), tmp_path, 5, {"step": 5}, cfg, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == [ckpt_io.LATEST, ckpt_io.tag_for(4), ckpt_io.tag_for(5)]
    ckpt_io.save(_FakeEngine(), tmp_path, 6, {"step": 6}, cfg, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == [ckpt_io.LATEST, ckpt_io.tag_for(6)]
    assert ckpt_io.resolve_resume("auto", tmp_path) == root / ckpt_io.tag_for(6)


def test_pruning_after_resuming_from_an_earlier_checkpoint_keeps_this_runs_own(tmp_path):
    """A run resumed from step 4 while the checkpoints of steps 6 and 8 remain: counted as the newest, those two
    pushed out every checkpoint the resumed run wrote but the last (here 5 and then 6's replacement survived, 7
    alone). They stay, uncounted, until this run reaches and replaces them."""
    cfg = load_config(REPO / "configs" / "test_1gpu.yaml")
    root = ckpt_io.checkpoint_root(tmp_path)
    for step in (2, 4, 6, 8):
        ckpt_io.save(_FakeEngine(), tmp_path, step, {"step": step}, cfg, keep_last=0)
    assert ckpt_io.later_complete(root / ckpt_io.tag_for(4)) == [ckpt_io.tag_for(6), ckpt_io.tag_for(8)]

    def left():
        return [int(p.name[len(ckpt_io.TAG_PREFIX):]) for p in sorted(root.iterdir()) if p.name != ckpt_io.LATEST]

    for step, expected in ((5, [4, 5, 6, 8]), (6, [5, 6, 8]), (7, [6, 7, 8]), (8, [7, 8]), (9, [8, 9])):
        ckpt_io.save(_FakeEngine(), tmp_path, step, {"step": step}, cfg, keep_last=2)
        assert left() == expected, step
        assert ckpt_io.resolve_resume("auto", tmp_path) == root / ckpt_io.tag_for(step)


def test_an_unusable_output_dir_is_a_clear_error_at_start_up(tmp_path, monkeypatch):
    """Found at the first checkpoint, an output dir that cannot be written fails the run after hours of training
    (with a bare OSError, on rank 0 alone): the start-up check names train.output_dir instead."""
    import errno

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="train.output_dir=.*cannot be created"):
        ckpt_io.check_output_dir(tmp_path / "file" / "run")

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt_io, "write_atomic", full)
    with pytest.raises(ConfigError, match="train.output_dir=.*not writable.*No space left"):
        ckpt_io.check_output_dir(tmp_path / "run")
    monkeypatch.undo()
    ckpt_io.check_output_dir(tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []  # the probe is gone


class _SizedEngine:
    """Writes a checkpoint of `size` bytes (a sparse file: no real disk used); `module` gives the first-save
    estimate."""

    def __init__(self, size: int, module=None):
        self.size, self.module = size, module

    def save_checkpoint(self, root, tag, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb") as f:
            f.truncate(self.size)


def _free(monkeypatch, nbytes: int) -> None:
    import shutil as real

    usage = real.disk_usage("/")
    monkeypatch.setattr(ckpt_io.shutil, "disk_usage",
                        lambda path: usage._replace(free=nbytes() if callable(nbytes) else nbytes))


def test_a_checkpoint_that_will_not_fit_stops_before_writing_and_old_ones_make_room_first(tmp_path, monkeypatch):
    """A disk that fills during DeepSpeed's save fails only the ranks that hit it; the others wait in its barriers
    until the process-group timeout. The room is checked first: the checkpoints the pruning after the save would
    remove anyway go early, and if that is not enough every rank stops with the reason, nothing written."""
    mb = 1 << 20
    cfg = load_config(REPO / "configs" / "test_1gpu.yaml")
    root = ckpt_io.checkpoint_root(tmp_path)
    engine = _SizedEngine(200 * mb)
    for step in (2, 4):
        ckpt_io.save(engine, tmp_path, step, {"step": step}, cfg, keep_last=0)
    (root / ckpt_io.tag_for(5)).mkdir()  # a dead save
    (root / ckpt_io.tag_for(5) / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")
    heard = []
    _free(monkeypatch, 100 * mb)  # 200 MB needed: step_2 (pruned after the save anyway) makes room
    ckpt_io.save(engine, tmp_path, 6, {"step": 6}, cfg, keep_last=2, log=heard.append)
    assert sorted(p.name for p in root.iterdir()) == [ckpt_io.LATEST, ckpt_io.tag_for(4), ckpt_io.tag_for(6)]
    assert heard and ckpt_io.tag_for(2) in heard[0] and ckpt_io.tag_for(5) in heard[0]

    # keep_last=1: step_4 could go early, but with 10 MB free it does not make room (the newest never goes early):
    # nothing is removed or written
    _free(monkeypatch, 10 * mb)
    with pytest.raises(ckpt_io.NoRoomForCheckpoint) as e:
        ckpt_io.save(engine, tmp_path, 8, {"step": 8}, cfg, keep_last=1)
    msg = str(e.value)
    assert "step_00000008" in msg and "0.01 GB free" in msg
    assert "needs about 0.22 GB (step_00000006 takes 0.20 GB)" in msg
    assert f"{ckpt_io.tag_for(6)} is intact" in msg
    assert "train.keep_last" not in msg  # 1 is the least
    assert sorted(p.name for p in root.iterdir()) == [ckpt_io.LATEST, ckpt_io.tag_for(4), ckpt_io.tag_for(6)]
    assert ckpt_io.resolve_resume("auto", tmp_path) == root / ckpt_io.tag_for(6)

    _free(monkeypatch, 250 * mb)  # enough: nothing removed early, the usual pruning after the save
    heard.clear()
    ckpt_io.save(engine, tmp_path, 8, {"step": 8}, cfg, keep_last=1, log=heard.append)
    assert heard == [] and sorted(p.name for p in root.iterdir()) == [ckpt_io.LATEST, ckpt_io.tag_for(8)]


def test_the_first_checkpoints_room_is_estimated_from_the_trainable_parameters(tmp_path, monkeypatch):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 1000))  # 2.002 M parameters
    model[0].requires_grad_(False)
    cfg = load_config(REPO / "configs" / "test_1gpu.yaml")
    _free(monkeypatch, 20 << 20)  # 12 bytes x 1.001 M trainable = 12 MB, + 5 % + 16 MB margin > 20 MB
    with pytest.raises(ckpt_io.NoRoomForCheckpoint, match="needs about 0.03 GB"):
        ckpt_io.save(_SizedEngine(1, module=model), tmp_path, 2, {"step": 2}, cfg)
    assert not (ckpt_io.checkpoint_root(tmp_path) / ckpt_io.tag_for(2)).exists()
    _free(monkeypatch, 40 << 20)
    ckpt_io.save(_SizedEngine(1, module=model), tmp_path, 2, {"step": 2}, cfg)


@pytest.mark.slow
def test_training_that_runs_out_of_room_stops_with_the_reason_and_keeps_its_checkpoint(corpus, tmp_path):
    """The whole path: `dualloop train` saves step 2, finds no room for step 4, exits 3 naming the reason;
    step 2 stays the checkpoint to resume from."""
    out = tmp_path / "run"
    config = _config(tmp_path / "c.yaml", corpus, out, steps=4, save_every=2, keep_last=1)
    script = ("import shutil, sys\n"
              "from pathlib import Path\n"
              "import dualloop.train.checkpoint as c\n"
              "real = shutil.disk_usage\n"
              f"done = Path({str(out)!r}) / 'checkpoints' / 'step_00000002' / 'COMPLETE'\n"
              "c.shutil.disk_usage = lambda p: real(p)._replace(free=0 if done.exists() else real(p).free)\n"
              "from dualloop.train.trainer import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    code, log = _run([sys.executable, "-c", script, "--config", str(config)])
    assert code == 3, log
    assert "no room for the checkpoint step_00000004" in log and "step_00000002 is intact" in log, log
    root = ckpt_io.checkpoint_root(out)
    assert sorted(p.name for p in root.glob(ckpt_io.TAG_PREFIX + "*")) == [ckpt_io.tag_for(2)]
    assert ckpt_io.resolve_resume("auto", out) == root / ckpt_io.tag_for(2)


@pytest.mark.slow
def test_a_data_worker_stuck_reading_stops_the_run_naming_the_files(corpus, tmp_path):
    """A worker hung on a filesystem would hold its rank forever, and the others until the process-group timeout,
    with nothing that says 'data'. data.timeout stops the run (exit 3) naming the samples it waited for."""
    config = _config(tmp_path / "c.yaml", corpus, tmp_path / "run", steps=2, micro_batch_size=2)
    tree = yaml.safe_load(config.read_text())
    tree["data"].update(num_workers=1, timeout=3)
    config.write_text(yaml.safe_dump(tree))
    script = ("import sys, time\n"
              "from dualloop.data import mixture\n"
              "def hung(self, index):\n"
              "    time.sleep(3600)\n"
              "mixture.MixtureDataset.__getitem__ = hung  # the forked worker inherits it\n"
              "from dualloop.train.trainer import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    code, log = _run([sys.executable, "-c", script, "--config", str(config)], timeout=90)
    assert code == 3, log[-3000:]
    assert "no batch from the data workers in 3 s (data.timeout)" in log, log[-3000:]
    first = [d["name"] for d in corpus["datasets"]]
    assert any(f"{name}: {{" in log for name in first), log[-3000:]  # a dataset's name and the sample's files
    bad = yaml.safe_load(config.read_text())
    bad["data"]["timeout"] = -1
    config.write_text(yaml.safe_dump(bad))
    code, log = _run([sys.executable, "-m", "dualloop.train", "--config", str(config)])
    assert code == 2 and "data.timeout must be >= 0" in log, log[-3000:]


def _run(cmd: list[str], timeout: int = TIMEOUT) -> tuple[int | None, str]:
    """(returncode, output); None on timeout (a hang), the whole process group killed."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        kill_tree(proc)  # the launcher and its workers (torchrun's are in sessions of their own)
        return None, output_after_kill(proc)


def _config(path: Path, data: dict, out: Path, **train) -> Path:
    data = {k: v for k, v in data.items() if k != "eval_datasets"}  # no evaluation in these runs
    cfg = {"model": {"preset": "tiny"}, "data": {**data, "num_workers": 0},
           "loop": {"caption_grad": "none", "caption": {"max_new_tokens": 2}, "loss": {"backend": "torch"}},
           "train": {"output_dir": str(out), "micro_batch_size": 2, "grad_accum": 1, "warmup_ratio": 0.0,
                     "ds_config": "zero3_bf16", "progress_bar": False, "tensorboard": False, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _data_state(out: Path, step: int) -> dict:
    return json.loads((ckpt_io.checkpoint_root(out) / ckpt_io.tag_for(step) / "trainer_state.json").read_text())["data"]


@pytest.mark.slow
def test_resume_after_the_data_mixture_changed_starts_a_new_epoch_and_says_so(corpus, tmp_path):
    """The data position counts into one mixture's permutation: resumed with other datasets or repeat factors it
    must not be applied to the new permutation (silently repeating and skipping samples)."""
    out = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.yaml", corpus, out, steps=2, save_every=1, keep_last=0)
    cmd = [sys.executable, "-m", "dualloop.train", "--config", str(cfg)]
    for steps in (2, 3):  # a run, then a resume with the same data: the position carries over
        rc, log = _run(cmd + [f"train.steps={steps}"])
        assert rc == 0, log[-4000:]
    assert "data changed" not in log
    assert _data_state(out, 3) == {"epoch": 0, "position": 6, "offset": 0, "replicas": 1}

    tree = yaml.safe_load(cfg.read_text())
    refcoco = next(d for d in tree["data"]["datasets"] if d["kind"] == "refcoco")
    refcoco["repeats"] = 1
    cfg.write_text(yaml.safe_dump(tree))
    rc, log = _run(cmd + ["train.steps=4"])
    assert rc == 0, log[-4000:]
    assert "data changed since" in log and f"{refcoco['name']}: " in log and "new epoch" in log, log[-3000:]
    assert "data.datasets [" not in log  # not once more as two whole dataset lists among the changed settings
    assert _data_state(out, 4) == {"epoch": 1, "position": 2, "offset": 0, "replicas": 1}  # a new epoch


@pytest.mark.slow
def test_resume_with_a_new_lr_steps_and_batch_split_applies_them(corpus, tmp_path):
    """DeepSpeed restores the optimizer's and the schedule's saved lr: a run resumed with a new train.lr kept the old
    one silently, and its first step used the old schedule's lr (here 0: the old cosine had ended). The new settings
    must apply, the schedule continue at the checkpoint's step, and the log say what changed. Micro-batch and
    accumulation may change (README): the data position counts samples."""
    out = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.yaml", corpus, out, steps=2, save_every=2, keep_last=0, lr=1e-3)
    cmd = [sys.executable, "-m", "dualloop.train", "--config", str(cfg)]
    rc, log = _run(cmd)
    assert rc == 0, log[-4000:]
    rc, log = _run(cmd + ["train.steps=4", "train.lr=1e-4", "train.micro_batch_size=1", "train.grad_accum=2"])
    assert rc == 0, log[-4000:]
    assert "train.lr 0.001 -> 0.0001" in log and "train.steps 2 -> 4" in log, log[-3000:]
    from dualloop.train.engine import warmup_cosine

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records[2:]:
        assert r["lr"] == pytest.approx(1e-4 * warmup_cosine(r["step"] - 1, total=4, warmup=0, min_ratio=0.0))
    assert records[-1]["samples_seen"] == 8
    assert _data_state(out, 4) == {"epoch": 0, "position": 8, "offset": 0, "replicas": 1}


WORKER = r'''
import json, os, sys
from dualloop.config import ConfigError, load_config
cfg = load_config(sys.argv[1])
rank = int(os.environ["RANK"])
cfg.train.output_dir = os.path.join(cfg.train.output_dir, f"node{rank}")  # each rank its own "node-local" disk
if sys.argv[3] == "resume":  # only the first "node" holds a checkpoint
    from dualloop.train import checkpoint as ckpt_io
    from dualloop.train.engine import init_distributed
    init_distributed("cpu")
    if rank == 0:
        d = ckpt_io.checkpoint_root(cfg.train.output_dir) / ckpt_io.tag_for(2)
        d.mkdir(parents=True)
        (d / ckpt_io.COMPLETE).write_text("2")
    try:
        ckpt_io.resolve_resume_everywhere("auto", cfg.train.output_dir)
        result = "resumed"
    except ConfigError as e:
        result = str(e)
else:
    from dualloop.train.trainer import Trainer
    try:
        Trainer(cfg)
        result = "started"
    except ConfigError as e:
        result = str(e)
json.dump(result, open(f"{sys.argv[2]}.rank{rank}.json", "w"))
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["start", "resume"])
def test_ranks_seeing_different_output_dirs_stop_with_a_message_instead_of_hanging(corpus, tmp_path, stage):
    """Multi-node with output_dir on node-local disks: rank 0 alone finds the checkpoint and resumes while the
    others start over, and the ranks then wait on each other's collectives (measured: a hang until the process
    group timeout). Every rank must stop with the same clear error, at start-up."""
    cfg = _config(tmp_path / "cfg.yaml", corpus, tmp_path / "run", steps=1)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    rc, log = _run(torchrun(worker, cfg, tmp_path / "result", stage), timeout=90)
    assert rc == 0, log[-4000:]
    results = [json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1)]
    expected = "not shared by all ranks" if stage == "start" else "found different checkpoints"
    assert all(expected in r for r in results), results


FULL_DISK_WORKER = r'''
import errno, faulthandler, json, os, sys, time
faulthandler.dump_traceback_later(60, exit=True)  # a hang ends here with every thread's stack (torchrun's workers
# outlive a killed launcher: they run in sessions of their own)
import deepspeed, torch
import deepspeed.runtime.engine as ds_engine
from dualloop.config import load_config
from dualloop.distributed import leave_together
from dualloop.train import checkpoint as ckpt_io
from dualloop.train.engine import init_distributed

out, config_path, result = sys.argv[1:4]
rank, _ = init_distributed("cpu")
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.Adam(net.parameters()), config=ds)
engine.backward(engine(torch.randn(2, 8)).square().mean())
engine.step()
cfg = load_config(config_path)

fail = None  # (rank, end of a file name): that rank finds the disk full when it writes that file


def filling(real, index):  # index: the argument naming the file written
    def write(*args, **kwargs):
        path = str(args[index])
        if fail is not None and fail[0] == rank and path.endswith(fail[1]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(*args, **kwargs)
    return write


torch.save = filling(torch.save, 1)  # DeepSpeed's checkpoint engine and ours
ds_engine.copyfile = filling(ds_engine.copyfile, 1)  # DeepSpeed's recovery scripts (rank 0)
ckpt_io.write_atomic = filling(ckpt_io.write_atomic, 0)  # COMPLETE, latest (rank 0)
root = ckpt_io.checkpoint_root(out)
results = []
for step, fail in [(1, None), (2, (1, "optim_states.pt")), (3, (1, "rng_state_rank1.pt")),
                   (4, (0, "zero_to_fp32.py")), (5, (0, "latest")), (6, None)]:
    start = time.monotonic()
    try:
        ckpt_io.save(engine, out, step, {"step": step}, cfg, keep_last=0, rank_state={"ema": torch.zeros(2)})
        error = None
    except Exception as e:  # the trainer stops on a NoRoomForCheckpoint (exit 3); a rank that failed alone stays
        error = [type(e).__name__, str(e)]  # here to show what the others do meanwhile
    seconds = time.monotonic() - start
    torch.distributed.barrier()  # rank 0 has finished clearing up after a failure
    results.append({"step": step, "error": error, "seconds": seconds,
                    "complete": (root / ckpt_io.tag_for(step) / ckpt_io.COMPLETE).exists(),
                    "first_complete": (root / ckpt_io.tag_for(1) / ckpt_io.COMPLETE).is_file(),
                    "latest": (root / ckpt_io.LATEST).read_text()})
json.dump(results, open(f"{result}.rank{rank}.json", "w"))
leave_together()
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


@pytest.mark.slow
def test_a_write_failing_on_one_rank_mid_save_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    """The disk fills (another job writes there) or a write fails on some ranks only, half-way through a save: inside
    DeepSpeed's save_checkpoint (an optimizer shard, the recovery scripts), in our RNG state, or rank 0's `latest`.
    The ranks that failed raised alone while the others waited in DeepSpeed's barriers or ours until the
    process-group timeout (measured: a hang). Every rank must raise the reason at once (a NoRoomForCheckpoint:
    the trainer exits 3 with it), naming the ranks and the directory; nothing may be marked complete or latest,
    the previous checkpoint stays the one to resume from, and the group stays usable."""
    worker = tmp_path / "worker.py"
    worker.write_text(FULL_DISK_WORKER)
    out = tmp_path / "run"
    rc, log = _run(torchrun(worker, out, REPO / "configs" / "test_1gpu.yaml", tmp_path / "result"), timeout=120)
    assert rc == 0, log[-4000:]
    first = ckpt_io.tag_for(1)
    failing = {2: 1, 3: 1, 4: 0, 5: 0}  # step -> the rank whose write failed
    for rank in (0, 1):
        results = {r["step"]: r for r in json.loads((tmp_path / f"result.rank{rank}.json").read_text())}
        for step, bad in failing.items():
            r, ckpt = results[step], ckpt_io.checkpoint_root(out) / ckpt_io.tag_for(step)
            assert r["error"] is not None and r["error"][0] == "CheckpointWriteFailed", (rank, r)
            message = r["error"][1]
            assert f"rank {bad} failed" in message and f"rank {1 - bad} failed" not in message, message
            assert str(ckpt) in message and "No space left on device" in message, message
            assert f"{first} is intact" in message and "train.resume=auto" in message, message
            assert not r["complete"] and r["first_complete"] and r["latest"] == first, (rank, r)
        assert results[1]["error"] is None and results[6]["error"] is None, results
        assert results[6]["complete"] and results[6]["latest"] == ckpt_io.tag_for(6)
