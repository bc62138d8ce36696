"""Resuming on another number of ranks: a 2-rank ZeRO-3 run's checkpoint resumed on 1 process and that run's
checkpoint on 2 ranks (through DeepSpeed's universal checkpoint, converted once). The loaded weights (frozen ones
too), fp32 masters, Adam moments and caption EMA equal the saved ones; the step, the lr schedule and the data
position go on (no sample of the epoch dealt twice, none skipped); a checkpoint that cannot be converted is an error
naming it and why; a conversion is atomic, reused, and not reused once the step is saved again.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train_dist import _launch, _summary, torchrun

from dualloop.config import ConfigError
from dualloop.data.mixture import MixtureSampler
from dualloop.train import checkpoint as ckpt_io
from dualloop.train import checkpoint_layout as ckpt_layout
from dualloop.train import reshard
from dualloop.train.ema import CaptionEMA
from dualloop.train.engine import warmup_cosine

TIMEOUT = 300
LR = 1e-3
STEPS = 4  # the schedule's length in every run: the first stops after 2 (see WORKER)

WORKER = r'''
import faulthandler, sys
faulthandler.dump_traceback_later(int(sys.argv[4]), exit=True)  # a hang prints every stack and exits
import torch
import torch.distributed as dist
import deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from dualloop.config import load_config
from dualloop.distributed import leave_together
from dualloop.train.trainer import Trainer

cfg_path, out_path, stop_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
tr = Trainer(load_config(cfg_path))
rng = torch.get_rng_state()  # as the resume left it


def whole_state():
    """Collective: every weight (frozen ones too), the trainable ones' fp32 masters and Adam moments (DeepSpeed's
    own gather, not the conversion's code), the caption EMA laid end to end over the ranks."""
    state = {}
    opt = tr.engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2: DeepSpeed links the moments of the full-precision weights after its first optimizer step of
        # group 0 only; later groups' have none then, and safe_get_full_optimizer_state finds nothing
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for name, p in tr.model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            state[f"weight/{name}"] = p.detach().float().clone()
        if p.requires_grad:
            state[f"fp32/{name}"] = safe_get_full_fp32_param(p).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).clone()
    names = {id(p): n for n, p in tr.model.named_parameters()}
    every = [None] * tr.world
    dist.all_gather_object(every, [s.clone() for s in tr.ema.shadow])
    for i, p in enumerate(tr.ema.params):
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-1/2: each rank's shadow is whole, the first is taken
        state[f"ema/{names[id(p)]}"] = torch.cat([s[i].reshape(-1) for s in every])[:numel]
    groups = tr.engine.optimizer.optimizer.param_groups
    state["weight_decay"] = [g["weight_decay"] for g in groups]
    # Adam's step count (its bias correction), one per flat group on every stage
    steps = {float(s["step"]) for s in tr.engine.optimizer.optimizer.state.values() if "step" in s}
    state["adam_steps"] = sorted(steps)
    return state


taken = []
class Recording(type(tr.sampler)):  # the data indices this rank consumes (num_workers=0: nothing prefetched)
    def __iter__(self):
        for index in super().__iter__():
            taken.append(index)
            yield index
tr.sampler.__class__ = Recording

loaded = whole_state() if tr.start_step else None  # a fresh optimizer has no moments yet
if stop_after:
    tr.cfg.train.steps = stop_after  # the engine's schedule keeps train.steps' length; fit stops (and saves) here
summary = tr.fit()
final = whole_state()
every_taken, every_rng = [None] * tr.world, [None] * tr.world
dist.all_gather_object(every_taken, taken)
dist.all_gather_object(every_rng, rng)
if tr.rank == 0:
    torch.save({"loaded": loaded, "final": final, "taken": every_taken, "rng": every_rng, "start_step": tr.start_step,
                "summary": summary}, out_path)
leave_together()
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


def _config(path: Path, corpus: dict, out: Path, model: dict | None = None, **train) -> Path:
    data = {k: v for k, v in corpus.items() if k != "eval_datasets"}
    path.write_text(yaml.safe_dump({
        "model": model or {"preset": "tiny"},
        "data": {**data, "num_workers": 0},
        "loop": {"caption_grad": "none", "caption": {"max_new_tokens": 2, "ema_decay": 0.5},
                 "loss": {"backend": "torch", "caption": 1.0}},
        "train": {"output_dir": str(out), "micro_batch_size": 2, "grad_accum": 1, "lr": LR, "warmup_ratio": 0.0,
                  "steps": STEPS, "save_every": 2, "ds_config": "zero3_bf16", "precision": "bf16",
                  "progress_bar": False, "tensorboard": False, **train}}))
    return path


def _run_worker(tmp: Path, cfg: Path, nproc: int, stop_after: int = 0) -> tuple[dict, str]:
    worker, result = tmp / "worker.py", tmp / "result.pt"
    worker.write_text(WORKER)
    args = (worker, cfg, result, stop_after, TIMEOUT - 30)
    rc, log = _launch(torchrun(*args, nproc=nproc) if nproc > 1 else [sys.executable, *map(str, args)], TIMEOUT)
    assert rc == 0, f"run on {nproc} rank(s) failed (rc {rc}):\n{log[-6000:]}"
    return torch.load(result, weights_only=False), log


def _epoch_order(corpus: dict) -> np.ndarray:
    """Epoch 0's order of the mixture: the whole permutation, as one rank is dealt it."""
    from dualloop.data import build_mixture

    mixture = build_mixture(corpus["datasets"], seed=corpus.get("seed", 0))
    return MixtureSampler(len(mixture), num_replicas=1, rank=0, seed=corpus.get("seed", 0)).indices(0)


def _data_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())["data"]


def _lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _scheduled_lr(step: int) -> float:
    """The lr of optimizer step `step` (1-based) in a STEPS-long cosine without warmup."""
    return LR * warmup_cosine(step - 1, total=STEPS, warmup=0, min_ratio=0.0)


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory) -> dict:
    """2 ranks, 2 of the schedule's 4 steps, a checkpoint at step 2."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    result, _ = _run_worker(tmp, _config(tmp / "cfg.yaml", corpus, tmp / "run"), nproc=2, stop_after=2)
    return {"result": result, "ckpt": tmp / "run" / "checkpoints" / ckpt_io.tag_for(2)}


@pytest.fixture(scope="module")
def one_rank(corpus, two_ranks, tmp_path_factory) -> dict:
    """That checkpoint resumed on 1 process, to the end of the schedule (steps 3 and 4, a checkpoint at 4)."""
    tmp = tmp_path_factory.mktemp("one_rank")
    out = tmp / "run"
    result, log = _run_worker(tmp, _config(tmp / "cfg.yaml", corpus, out, resume=str(two_ranks["ckpt"])), nproc=1)
    return {"result": result, "log": log, "out": out}


@pytest.mark.slow
def test_two_ranks_resume_on_one_with_the_same_weights_moments_schedule_and_data(corpus, two_ranks, one_rank,
                                                                                  tmp_path):
    saved, resumed = two_ranks["result"]["final"], one_rank["result"]["loaded"]
    assert saved.keys() == resumed.keys() and any(k.startswith("ema/") for k in saved)
    assert any(".lora_" in k for k in saved) and any(k.startswith("fp32/") and "rows" in k for k in saved)
    differ = [k for k in saved if k not in ("weight_decay", "adam_steps") and not torch.equal(saved[k], resumed[k])]
    assert saved["adam_steps"] == resumed["adam_steps"] == [2.0]
    assert not differ, f"{len(differ)} tensors differ after the resume on 1 process, e.g. {differ[:5]}"
    assert resumed["weight_decay"] == saved["weight_decay"] and len(set(saved["weight_decay"])) == 2
    log = one_rank["log"]
    home = reshard.conversion_home(two_ranks["ckpt"], one_rank["out"])
    assert home.parent == one_rank["out"] / "checkpoints"  # another run's checkpoint: converted in this run's dir
    assert (f"checkpoint {two_ranks['ckpt']} was written by 2 ranks, this run has 1: converted it once into "
            f"{home / ckpt_layout.UNIVERSAL}") in log, log
    assert "data position: the 2 ranks had consumed the first 8 of the" in log, log
    # the step counter and the schedule go on
    assert one_rank["result"]["start_step"] == 2 and one_rank["result"]["summary"]["steps_run"] == 2
    # the saved RNG streams were 2 ranks' own: the 1 rank's is seeded from (seed, rank, step)
    with torch.random.fork_rng(devices=[]):
        ckpt_io.reseed_rng(0, 0, 2)
        assert torch.equal(one_rank["result"]["rng"][0], torch.get_rng_state())
    lrs = _lrs(one_rank["out"])
    assert list(lrs) == [3, 4]
    for step, lr in lrs.items():
        assert lr == pytest.approx(_scheduled_lr(step))
    # the data: the 2 ranks were dealt the epoch's first 8 places; the 1 rank goes on with places 8..11
    order = _epoch_order(corpus)
    before = two_ranks["result"]["taken"]
    assert sorted(before[0] + before[1]) == sorted(order[:8].tolist())
    assert one_rank["result"]["taken"] == [order[8:12].tolist()]
    ckpt4 = one_rank["out"] / "checkpoints" / ckpt_io.tag_for(4)
    assert _data_state(ckpt4) == {"epoch": 0, "position": 4, "offset": 8, "replicas": 1}
    assert ckpt_io.started_from(ckpt4) == str(two_ranks["ckpt"].resolve())  # what a requeued job goes on from
    # nothing written into the other run's checkpoint; the conversion went once this run had saved its own
    assert not ckpt_layout.conversions(two_ranks["ckpt"]) and not home.exists()


@pytest.mark.slow
def test_a_zero2_run_resumes_on_another_number_of_ranks_with_the_same_weights_and_moments(corpus, tmp_path):
    """The same as above under ZeRO-2 (bf16): 2 ranks to step 2, then 1 rank from that checkpoint."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    saved, _ = _run_worker(two, _config(two / "cfg.yaml", corpus, two / "run", ds_config="zero2_bf16"), nproc=2,
                           stop_after=2)
    ckpt = two / "run" / "checkpoints" / ckpt_io.tag_for(2)
    assert (ckpt / "mp_rank_00_model_states.pt").is_file()  # written as ZeRO-2 writes
    resumed, log = _run_worker(one, _config(one / "cfg.yaml", corpus, one / "run", ds_config="zero2_bf16",
                                            resume=str(ckpt)), nproc=1)
    saved, loaded = saved["final"], resumed["loaded"]
    assert saved.keys() == loaded.keys() and any(k.startswith("exp_avg/") for k in saved)
    differ = [k for k in saved if not (torch.equal(saved[k], loaded[k]) if torch.is_tensor(saved[k])
                                       else saved[k] == loaded[k])]
    assert not differ, f"{len(differ)} differ after the resume on 1 process, e.g. {differ[:5]}"
    assert "was written by 2 ranks, this run has 1: converted it once" in log, log
    assert resumed["start_step"] == 2 and resumed["summary"]["steps_run"] == 2
    # export's consolidation of the ZeRO-2 checkpoint: the trained weights' fp32 masters, the frozen ones as trained
    from dualloop.train.export import consolidated_state_dict

    whole = consolidated_state_dict(ckpt)
    trained = {k.removeprefix("fp32/") for k in saved if k.startswith("fp32/")}
    assert trained and all(torch.equal(whole[n].float(), saved[f"fp32/{n}"]) for n in trained)
    frozen = [k.removeprefix("weight/") for k in saved if k.startswith("weight/")
              and k.removeprefix("weight/") not in trained]
    assert frozen and all(torch.equal(whole[n].float(), saved[f"weight/{n}"]) for n in frozen)


@pytest.mark.slow
def test_a_run_resumes_under_the_other_zero_stage_family_with_the_same_weights_and_moments(corpus, tmp_path):
    """ZeRO-3 (1 process) to step 2, on under ZeRO-2 to step 4, then under ZeRO-3 again: at each change every weight,
    fp32 master, Adam moment and the caption EMA loaded equal the ones saved, and the run goes on from the step.
    The model is built from files (`preset: pretrained`), as real runs are: a universal load restores the trained
    weights, and the frozen ones come from the model's files (randomly initialized ones would differ between the
    stages: ZeRO-3 draws them in bf16 under zero.Init)."""
    from dualloop.config import LoraConfig, ModelConfig
    from dualloop.model import build_model
    from dualloop.model.build import save_pretrained

    torch.manual_seed(0)
    save_pretrained(build_model(ModelConfig(preset="tiny", dtype="float32", lora=LoraConfig(enabled=False))),
                    tmp_path / "base", hf_layout=True)
    model = {"preset": "pretrained", "vlm_path": str(tmp_path / "base" / "vlm"),
             "sam2_path": str(tmp_path / "base" / "sam2")}
    runs = [tmp_path / name for name in ("zero3", "zero2", "zero3_again")]
    for run in runs:
        run.mkdir()
    first, _ = _run_worker(runs[0], _config(runs[0] / "cfg.yaml", corpus, runs[0] / "run", model), nproc=1,
                           stop_after=2)
    previous, ckpt = first, runs[0] / "run" / "checkpoints" / ckpt_io.tag_for(2)
    for run, ds_config, step, was in ((runs[1], "zero2_bf16", 2, "stage 3"),
                                      (runs[2], "zero3_bf16", 4, "stage 1 or 2 (mp_rank_00_model_states.pt)")):
        resumed, log = _run_worker(run, _config(run / "cfg.yaml", corpus, run / "run", model, ds_config=ds_config,
                                                resume=str(ckpt), steps=STEPS + 2), nproc=1, stop_after=step + 2)
        saved, loaded = previous["final"], resumed["loaded"]
        # ZeRO-3 leaves its persistent (tiny) weights out of the EMA: under ZeRO-2 theirs start from the live value
        new_ema = [k for k in loaded.keys() - saved.keys() if k.startswith("ema/")]
        assert {k for k in saved if not k.startswith("ema/")} == {k for k in loaded if not k.startswith("ema/")}
        assert bool(new_ema) == (ds_config == "zero2_bf16") and saved["adam_steps"] == [float(step)]
        assert all(torch.equal(loaded[k], loaded[f"weight/{k.removeprefix('ema/')}"].reshape(-1)) for k in new_ema)
        both = [k for k in saved if k in loaded]
        assert any(k.startswith("ema/") for k in both)
        differ = [k for k in both if not (torch.equal(saved[k], loaded[k]) if torch.is_tensor(saved[k])
                                          else saved[k] == loaded[k])]
        assert not differ, f"{len(differ)} differ after the resume under {ds_config}, e.g. {differ[:5]}"
        assert f"was written under ZeRO {was} and this run's ds_config has stage" in log, log[-3000:]
        assert resumed["start_step"] == step and resumed["summary"]["steps_run"] == 2
        previous, ckpt = resumed, run / "run" / "checkpoints" / ckpt_io.tag_for(step + 2)


@pytest.mark.slow
def test_two_zero3_ranks_resume_as_two_zero2_ranks(corpus, two_ranks, tmp_path):
    """The 2-rank ZeRO-3 checkpoint (random `tiny` preset) resumed by 2 ZeRO-2 ranks: every rank's model-state shard
    beside the alias, the EMA partitioned there and whole here. The trained weights, fp32 masters, Adam moments and
    step and the EMA are as saved; the preset's frozen weights are drawn anew, and the run says so."""
    resumed, log = _run_worker(tmp_path, _config(tmp_path / "cfg.yaml", corpus, tmp_path / "run",
                                                 ds_config="zero2_bf16", resume=str(two_ranks["ckpt"])), nproc=2)
    saved, loaded = two_ranks["result"]["final"], resumed["loaded"]
    trained = {k.removeprefix("fp32/") for k in saved if k.startswith("fp32/")}
    frozen = {k for k in saved if k.startswith("weight/") and k.removeprefix("weight/") not in trained}
    assert trained and frozen and saved["adam_steps"] == loaded["adam_steps"] == [2.0]
    kept = [k for k in saved if k in loaded and k not in frozen and k != "adam_steps"]
    assert any(k.startswith("ema/") for k in kept) and any(k.startswith("exp_avg_sq/") for k in kept)
    differ = [k for k in kept if not (torch.equal(saved[k], loaded[k]) if torch.is_tensor(saved[k])
                                      else saved[k] == loaded[k])]
    assert not differ, f"{len(differ)} differ after the resume under ZeRO-2, e.g. {differ[:5]}"
    assert "this run's ds_config has stage 2: converted it once" in log
    assert log.count("warning: model.preset=tiny draws its frozen weights at random") == 1, log[-3000:]
    assert resumed["start_step"] == 2 and resumed["summary"]["steps_run"] == 2


@pytest.mark.slow
def test_one_rank_resumes_on_two_through_the_train_command(corpus, one_rank, tmp_path):
    """`dualloop train` on 2 ranks (torchrun) from the 1-process run's checkpoint: it goes on at step 4 with the
    schedule and the data, and ends with exit 0 after printing its summary (exit_after_leaving)."""
    ckpt4 = one_rank["out"] / "checkpoints" / ckpt_io.tag_for(4)
    out = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.yaml", corpus, out, steps=STEPS + 1, resume=str(ckpt4), tensorboard=True)
    rc, log = _launch(torchrun("-m", "dualloop.train", "--config", cfg), TIMEOUT)
    assert rc == 0, log[-6000:]
    summary = _summary(log)
    assert summary["start_step"] == 4 and summary["world_size"] == 2 and summary["steps_run"] == 1
    assert "was written by 1 rank, this run has 2: converted it once" in log
    assert "data position: the 1 rank had consumed the first 12 of the" in log
    # written and flushed before the ranks left without the interpreter's teardown; the schedule (now 5 steps long)
    # at the checkpoint's step
    assert _lrs(out) == {5: pytest.approx(LR * warmup_cosine(4, total=STEPS + 1, warmup=0, min_ratio=0.0))}
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    # 12 places consumed; the 2 ranks are dealt order[12:] and each consumed one micro-batch of 2
    assert _data_state(out / "checkpoints" / ckpt_io.tag_for(5)) == {"epoch": 0, "position": 2, "offset": 12,
                                                                      "replicas": 2}
    assert "terminate called" not in log


@pytest.mark.slow
def test_a_checkpoint_missing_a_shard_stops_the_resume_on_another_world_size(corpus, two_ranks, tmp_path):
    """`dualloop train` on 1 process from a 2-rank checkpoint that lacks rank 1's optimizer shard: exit 2 naming the
    checkpoint, what it lacks and the way out; nothing converted."""
    broken = tmp_path / "checkpoints" / two_ranks["ckpt"].name
    shutil.copytree(two_ranks["ckpt"], broken, ignore=shutil.ignore_patterns(ckpt_layout.UNIVERSAL))
    next(broken.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()
    cfg = _config(tmp_path / "cfg.yaml", corpus, tmp_path / "run", resume=str(broken))
    rc, log = _launch([sys.executable, "-m", "dualloop.train", "--config", str(cfg)], TIMEOUT)
    assert rc == 2, log[-4000:]
    assert f"checkpoint {broken} was written by 2 ranks; it cannot be converted for this run" in log
    assert "it lacks rank 1's optim shard" in log and "Resume with 2 ranks" in log
    assert not ckpt_layout.conversions(broken) and not reshard.conversion_home(broken, tmp_path / "run").exists()


@pytest.mark.slow
def test_a_config_error_on_two_ranks_exits_2_on_both(corpus, two_ranks, tmp_path):
    """`dualloop train` on 2 ranks (torchrun) resuming the ZeRO-3 checkpoint under zero2_bf16 when it lacks a shard
    (so cannot be converted): every rank stops with the config error and exit code 2, not an abort in the
    interpreter's teardown (which a launcher reports as -6)."""
    broken = tmp_path / "checkpoints" / two_ranks["ckpt"].name
    shutil.copytree(two_ranks["ckpt"], broken, ignore=shutil.ignore_patterns(ckpt_layout.UNIVERSAL))
    next(broken.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()
    cfg = _config(tmp_path / "cfg.yaml", corpus, tmp_path / "run", resume=str(broken), ds_config="zero2_bf16")
    rc, log = _launch(torchrun("-m", "dualloop.train", "--config", cfg), TIMEOUT)
    assert rc == 1, log[-4000:]  # torchrun's own code when a worker failed; the workers' codes are in its report
    assert log.count("written under ZeRO stage 3 and this run's ds_config has stage 2; it cannot be converted for "
                     "this run: it lacks rank 1's optim shard") == 2, log[-4000:]
    assert log.count("exitcode  : 2 ") == 2 and "terminate called" not in log, log[-4000:]


# ------------------------------------------------------------------------------------------------ without ranks
def _fake_checkpoint(root: Path, world: int, layout: str = "zero3") -> Path:
    ckpt = root / ckpt_io.tag_for(2)
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": world}))
    (ckpt / ckpt_io.COMPLETE).write_text("2")
    for r in range(world):
        if layout == "zero3":
            (ckpt / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"m" * 10)
        (ckpt / f"{'bf16_' if layout == 'zero3' else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(
            b"o" * 100)
    if layout == "zero2":
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"m")
    return ckpt


@pytest.mark.parametrize("case", ["no_zero_now", "missing", "missing_zero2", "no_room"])
def test_what_cannot_be_converted_is_an_error_naming_the_checkpoint_and_why(tmp_path, monkeypatch, case):
    zero2 = case in ("no_zero_now", "missing_zero2")
    ckpt = _fake_checkpoint(tmp_path, 2, layout="zero2" if zero2 else "zero3")
    stage = {"missing_zero2": 2, "no_zero_now": 0}.get(case, 3)
    if case == "missing":
        (ckpt / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    if case == "missing_zero2":
        (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    if case == "no_room":
        monkeypatch.setattr(ckpt_io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 300, 300))
    calls = []
    monkeypatch.setattr("deepspeed.checkpoint.ds_to_universal.main", lambda args: calls.append(args))
    with pytest.raises(ConfigError) as e:
        reshard.prepare_resume(ckpt, 1, stage=stage)
    why = {"no_zero_now": "this run's ds_config has ZeRO stage 0", "missing": "it lacks rank 1's model shard",
           "missing_zero2": "it lacks rank 1's optim shard", "no_room": "GB are free"}[case]
    assert f"checkpoint {ckpt} was written by 2 ranks" in str(e.value) and why in str(e.value)
    assert "Resume with 2 ranks" in str(e.value) and not calls
    assert reshard.prepare_resume(ckpt, 2, stage=stage) is None  # the same number of ranks: nothing to convert


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("written, stage", [("zero2", 3), ("zero3", 2), ("zero3", 1)])
def test_a_change_of_zero_stage_family_converts_the_checkpoint(tmp_path, monkeypatch, written, stage, world):
    """On the same number of ranks too (DeepSpeed's own load fails there with a bare AssertionError): converted once,
    and the conversion holds the model-state file also under the name that the other stage family's load reads."""
    ckpt = _fake_checkpoint(tmp_path, 2, layout=written)
    calls, notes = [], []
    monkeypatch.setattr("deepspeed.checkpoint.ds_to_universal.main", _fake_converter(calls))
    assert reshard.prepare_resume(ckpt, world, stage=stage, log=notes.append) == 2 and len(calls) == 1
    was = "stage 1 or 2 (mp_rank_00_model_states.pt)" if written == "zero2" else "stage 3"
    other_world = "was written by 2 ranks, this run has 1; it " if world == 1 else ""
    assert notes[-1].startswith(f"checkpoint {ckpt} {other_world}was written under ZeRO {was} and this run's "
                                f"ds_config has stage {stage}: converted it once into"), notes[-1]
    assert notes[-1].endswith(f"repartitioned for {world} rank{'s' if world > 1 else ''} under ZeRO stage {stage})")
    source = ckpt_layout.WHOLE_MODEL_STATES if written == "zero2" else ckpt_layout.ZERO3_RANK0_MODEL_STATES
    converted = ckpt / ckpt_layout.UNIVERSAL / ckpt.name
    for name in (ckpt_layout.WHOLE_MODEL_STATES, ckpt_layout.ZERO3_RANK0_MODEL_STATES):
        assert (converted / name).read_bytes() == (ckpt / source).read_bytes()
    # a conversion made before stage changes were converted (one name only) gets the other when reused
    (converted / (ckpt_layout.ZERO3_RANK0_MODEL_STATES if written == "zero2" else
                  ckpt_layout.WHOLE_MODEL_STATES)).unlink()
    assert reshard.prepare_resume(ckpt, world, stage=stage, log=notes.append) == 2 and len(calls) == 1
    assert "reusing its conversion" in notes[-1]
    assert all((converted / name).is_file()
               for name in (ckpt_layout.WHOLE_MODEL_STATES, ckpt_layout.ZERO3_RANK0_MODEL_STATES))


def test_a_zero3_conversion_is_given_what_a_zero2_load_reads_and_back(tmp_path):
    """reshard._for_either_stage on the files DeepSpeed's converter writes from ZeRO-3 (bare flat tensors per weight,
    Adam's step only in the global state, no version) and from ZeRO-1/2 (no ZeRO-3 optimizer_state_dict); twice
    gives the same files, and nothing else lands in a weight's directory (DeepSpeed's ZeRO-1/2 load takes every
    `*.pt` there for a state)."""
    import deepspeed

    step = torch.tensor(4.0)
    groups = [{"lr": 1.0, "params": [0]}, {"lr": 1.0, "params": [1]}]
    z3 = tmp_path / "z3"
    (z3 / "zero" / "w").mkdir(parents=True)
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        torch.save(torch.arange(6.0), z3 / "zero" / "w" / f"{key}.pt")
    torch.save({"optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups},
                "param_groups": groups, "loss_scaler": None}, z3 / "zero" / "optimizer_state.pt")
    (z3 / ckpt_layout.ZERO3_RANK0_MODEL_STATES).write_bytes(b"m3")
    z2 = tmp_path / "z2"
    (z2 / "zero" / "w").mkdir(parents=True)
    torch.save({"param": torch.arange(6.0)}, z2 / "zero" / "w" / "fp32.pt")
    torch.save(step, z2 / "zero" / "w" / "step.pt")
    torch.save({"param_groups": groups, "ds_version": "0.19.8"}, z2 / "zero" / "optimizer_state.pt")
    (z2 / ckpt_layout.WHOLE_MODEL_STATES).write_bytes(b"m2")
    for converted in (z3, z2):
        reshard._for_either_stage(converted)
        first = {p.relative_to(converted): p.read_bytes() for p in converted.rglob("*") if p.is_file()}
        reshard._for_either_stage(converted)
        assert {p.relative_to(converted): p.read_bytes() for p in converted.rglob("*") if p.is_file()} == first
        assert (converted / ckpt_layout.WHOLE_MODEL_STATES).read_bytes() == \
            (converted / ckpt_layout.ZERO3_RANK0_MODEL_STATES).read_bytes()
        state = torch.load(converted / "zero" / "optimizer_state.pt", weights_only=False)
        assert state["ds_version"] == ("0.19.8" if converted is z2 else deepspeed.__version__)
        assert state["optimizer_state_dict"]["state"][0]["step"] == step
        assert state["optimizer_state_dict"]["param_groups"] == state["param_groups"] == groups
        assert torch.equal(torch.load(converted / "zero" / "w" / "step.pt"), step)
        assert not [p for p in converted.rglob(".*") if p.is_file()]  # no partial file left
    assert sorted(p.name for p in (z3 / "zero" / "w").iterdir()) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt",
                                                                      "step.pt"]
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert torch.equal(torch.load(z3 / "zero" / "w" / f"{key}.pt")["param"], torch.arange(6.0))


def test_a_stage_change_that_cannot_be_converted_says_both(tmp_path, monkeypatch):
    ckpt = _fake_checkpoint(tmp_path, 2, layout="zero3")
    (ckpt / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    monkeypatch.setattr("deepspeed.checkpoint.ds_to_universal.main", _fake_converter([]))
    with pytest.raises(ConfigError) as e:
        reshard.prepare_resume(ckpt, 2, stage=2)
    assert str(e.value) == (f"checkpoint {ckpt} was written by 2 ranks; it was written under ZeRO stage 3 and this "
                            "run's ds_config has stage 2; it cannot be converted for this run: it lacks rank 1's "
                            "model shard. Resume with 2 ranks under the ZeRO stage it was written with (or export "
                            "and start a new run)")


@pytest.mark.parametrize("stage", [1, 2])
def test_a_zero2_checkpoint_converts_for_a_zero1_or_2_run(tmp_path, monkeypatch, stage):
    ckpt = _fake_checkpoint(tmp_path, 2, layout="zero2")
    calls = []
    monkeypatch.setattr("deepspeed.checkpoint.ds_to_universal.main", _fake_converter(calls))
    assert reshard.prepare_resume(ckpt, 1, stage=stage) == 2 and len(calls) == 1


def _fake_converter(calls: list, fail: bool = False):
    def main(args):
        calls.append(args.output_folder)
        out = Path(args.output_folder)
        (out / "zero").mkdir(parents=True)
        torch.save({"param_groups": [{"lr": 1.0}]}, out / "zero" / "optimizer_state.pt")  # as from ZeRO-1/2
        (out / "zero" / "w").mkdir()
        torch.save(torch.tensor(2.0), out / "zero" / "w" / "step.pt")
        for f in Path(args.input_folder).glob("*model_states.pt"):  # DeepSpeed copies them
            shutil.copy2(f, out)
        if fail:
            raise OSError(28, "No space left on device")
    return main


def test_a_conversion_is_atomic_reused_and_redone_for_shards_saved_again(tmp_path, monkeypatch):
    ckpt = _fake_checkpoint(tmp_path, 2)
    calls, notes = [], []
    monkeypatch.setattr("deepspeed.checkpoint.ds_to_universal.main", _fake_converter(calls, fail=True))
    with pytest.raises(ConfigError, match=f"converting checkpoint {ckpt} for 1 rank failed.*No space left"):
        reshard.prepare_resume(ckpt, 1, stage=3)
    assert not ckpt_layout.conversions(ckpt)  # the half-made conversion is gone, nothing looks complete
    monkeypatch.setattr("deepspeed.checkpoint.ds_to_universal.main", _fake_converter(calls))
    assert reshard.prepare_resume(ckpt, 1, stage=3, log=notes.append) == 2
    assert (ckpt / ckpt_layout.UNIVERSAL / ckpt.name / "zero" / "optimizer_state.pt").is_file() and len(calls) == 2
    assert "converted it once" in notes[-1]
    assert reshard.prepare_resume(ckpt, 3, stage=3, log=notes.append) == 2
    assert len(calls) == 2 and "reusing its conversion" in notes[-1]
    # the step saved again (a rollback): its old conversion is not reused
    (ckpt / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"new" * 50)
    assert reshard.prepare_resume(ckpt, 1, stage=3, log=notes.append) == 2
    assert len(calls) == 3 and "converted it once" in notes[-1]


def test_another_runs_checkpoint_is_converted_in_this_runs_directory_until_it_saves(tmp_path, monkeypatch):
    """A checkpoint of another run (maybe read-only, not this run's to write into) is converted into this run's
    checkpoint directory, reused there, and removed once this run has saved a checkpoint of its own; a checkpoint of
    this run's own is converted in place."""
    from dualloop.config import load_config

    other = _fake_checkpoint(ckpt_io.checkpoint_root(tmp_path / "other"), 2)
    before = sorted(p.name for p in other.iterdir())
    calls, notes = [], []
    monkeypatch.setattr("deepspeed.checkpoint.ds_to_universal.main", _fake_converter(calls))
    out = tmp_path / "run"
    home = reshard.conversion_home(other, out)
    assert home.parent == ckpt_io.checkpoint_root(out) and home.name.startswith(".conversion-of-step_00000002-")
    assert reshard.prepare_resume(other, 1, stage=3, log=notes.append, output_dir=out) == 2
    assert f"converted it once into {home / ckpt_layout.UNIVERSAL}" in notes[-1]
    assert (home / ckpt_layout.UNIVERSAL / other.name / "zero" / "optimizer_state.pt").is_file()
    assert sorted(p.name for p in other.iterdir()) == before  # nothing written into the other run's checkpoint
    assert reshard.prepare_resume(other, 1, stage=3, log=notes.append, output_dir=out) == 2
    assert len(calls) == 1 and "reusing its conversion" in notes[-1]

    class Engine:
        def save_checkpoint(self, root, tag, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"m")

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "test_1gpu.yaml")
    ckpt_io.save(Engine(), out, 3, {"step": 3, "world_size": 1}, cfg)
    assert not home.exists()  # this run has its own checkpoint now
    own = _fake_checkpoint(ckpt_io.checkpoint_root(tmp_path / "own"), 2)
    assert reshard.conversion_home(own, tmp_path / "own") == own
    assert reshard.prepare_resume(own, 1, stage=3, output_dir=tmp_path / "own") == 2
    assert reshard.conversion_matches(own)


def test_a_requeued_job_resuming_another_runs_checkpoint_goes_on_from_its_own(tmp_path):
    """`train.resume=PATH` of another run's checkpoint: once this run (which started from PATH) has saved, a restart
    with the same setting goes on from this run's latest, not from PATH again; a checkpoint of this run's own named
    in train.resume (a rollback) stays the one resumed, and so does PATH for a run that did not start from it."""
    other = _fake_checkpoint(ckpt_io.checkpoint_root(tmp_path / "other"), 2)
    out = tmp_path / "run"
    assert ckpt_io.resolve_resume_everywhere(str(other), out) == other  # nothing of this run's yet
    own_root = ckpt_io.checkpoint_root(out)
    early = _fake_checkpoint(own_root, 1)  # step 2 of this run
    late = own_root / ckpt_io.tag_for(6)
    shutil.copytree(early, late)
    for ckpt in (early, late):
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": int(ckpt.name[5:]), "world_size": 1,
                                                               "started_from": str(other.resolve())}))
    (own_root / ckpt_io.LATEST).write_text(late.name)
    assert ckpt_io.resolve_resume_everywhere(str(other), out) == late
    assert ckpt_io.resolve_resume_everywhere(str(early), out) == early  # a rollback
    assert ckpt_io.resolve_resume_everywhere("auto", out) == late
    (late / "trainer_state.json").write_text(json.dumps({"step": 6, "world_size": 1, "started_from": None}))
    assert ckpt_io.resolve_resume_everywhere(str(other), out) == other  # this run did not start from it


def test_jobs_converting_one_checkpoint_at_once_keep_their_own_remains_and_share_the_result(tmp_path, monkeypatch):
    """Runs resumed from one checkpoint at once: a conversion removes only remains whose process is gone (on this
    host), and when another job put its conversion in place first, this one uses it."""
    import socket

    ckpt = _fake_checkpoint(tmp_path, 2)
    other_host = ckpt / f".{ckpt_layout.UNIVERSAL}.partial-elsewhere-1"
    dead_here = ckpt / f".{ckpt_layout.UNIVERSAL}.partial-{socket.gethostname()}-{2**22 + 12345}"
    other_host.mkdir()
    dead_here.mkdir()
    calls = []
    convert = _fake_converter(calls)

    def other_job_finishes_first(args):
        convert(args)
        done = ckpt / ckpt_layout.UNIVERSAL
        (done / ckpt.name).mkdir(parents=True)
        (done / ckpt_layout.UNIVERSAL_SOURCE).write_text(json.dumps(reshard._source(ckpt)))

    monkeypatch.setattr("deepspeed.checkpoint.ds_to_universal.main", other_job_finishes_first)
    notes = []
    assert reshard.prepare_resume(ckpt, 1, stage=3, log=notes.append) == 2
    assert "another job finished first" in notes[-1] and reshard.conversion_matches(ckpt)
    assert other_host.is_dir() and not dead_here.exists()
    assert not list(ckpt.glob(f".{ckpt_layout.UNIVERSAL}.partial-{socket.gethostname()}-*"))  # its own: gone


def test_saving_a_step_again_clears_its_old_per_rank_files_and_conversion(tmp_path):
    """A step saved again (a rollback) on fewer ranks than before: the old ranks' shards, RNG and extra state must
    not stay beside the new ones (export and a conversion would take them as part of it), nor its conversion."""
    from dualloop.config import load_config

    class Engine:
        def save_checkpoint(self, root, tag, save_latest):
            (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"m")

    root = ckpt_io.checkpoint_root(tmp_path)
    ckpt = _fake_checkpoint(root, 2)
    (ckpt / ckpt_layout.UNIVERSAL).mkdir()
    (ckpt / f".{ckpt_layout.UNIVERSAL}.partial-123").mkdir()
    for r in range(2):
        (ckpt / f"rng_state_rank{r}.pt").write_bytes(b"r")
        (ckpt / f"rank_state_rank{r}.pt").write_bytes(b"e")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "test_1gpu.yaml")
    ckpt_io.save(Engine(), tmp_path, 2, {"step": 2, "world_size": 1}, cfg)
    assert (ckpt / ckpt_io.COMPLETE).is_file() and not ckpt_layout.conversions(ckpt)
    # what this one-rank save wrote, and nothing of the two ranks' save before it
    per_rank = sorted(p.name for p in ckpt.iterdir() if ckpt_io.PER_RANK_FILE.search(p.name))
    assert per_rank == ["rng_state_rank0.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    assert (ckpt / "rng_state_rank0.pt").read_bytes() != b"r"


@pytest.mark.parametrize("length", [37, 40])
@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3), (4, 3)])
def test_the_data_position_continues_from_the_samples_all_old_ranks_consumed(length, old, new):
    """Old ranks consume `taken` indices each; the new ranks are dealt the rest of the epoch's order: no index of the
    epoch twice beyond the padding that equal shards need, none left out; the next epoch as a fresh run's."""
    order = MixtureSampler(length, seed=7).indices(0).tolist()
    for taken in (0, 3, math_ceil(length, old)):
        samplers = [MixtureSampler(length, num_replicas=old, rank=r, seed=7) for r in range(old)]
        before = [list(s)[:taken] for s in samplers]
        states = [s.state_dict(consumed=taken) for s in samplers]
        resumed = [MixtureSampler(length, num_replicas=new, rank=r, seed=7) for r in range(new)]
        for s in resumed:
            s.load_state_dict(states[0])
        after = [list(s) for s in resumed]
        done = min(taken * old, length)
        assert {i for b in before for i in b} == set(order[:done])  # dealt round-robin: the order's first places
        rest = [i for a in after for i in a]
        if done == length:  # the epoch was complete: the next one, whole
            assert all(s.epoch == 1 and s.offset == 0 for s in resumed)
            continue
        assert len({len(a) for a in after}) == 1  # equal shards: the ranks stay in lockstep
        assert sorted(set(rest)) == sorted(order[done:])  # the rest of the epoch, none left out, none of before
        assert len(rest) - len(set(rest)) < new  # only the padding of the last round repeats
        again = MixtureSampler(length, num_replicas=new, rank=0, seed=7)
        again.load_state_dict(resumed[0].state_dict(consumed=1))  # saved and resumed on the same ranks: exact
        assert list(again) == after[0][1:]
        resumed[0].set_epoch(1)
        assert list(resumed[0]) == list(MixtureSampler(length, num_replicas=new, rank=0, seed=7).indices(1))


def test_reseeded_rng_streams_differ_by_rank_and_step_and_repeat():
    draws = {}
    with torch.random.fork_rng(devices=[]):
        for rank, step in ((0, 2), (1, 2), (0, 3), (0, 2)):
            ckpt_io.reseed_rng(5, rank, step)
            draws.setdefault((rank, step), []).append((torch.rand(3).tolist(), np.random.rand(), random.random()))
    assert draws[(0, 2)][0] == draws[(0, 2)][1]
    assert len({str(v[0]) for v in draws.values()}) == 3


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)


def _ema_on(world: int, rank: int, wholes: list[torch.Tensor]) -> CaptionEMA:
    params = []
    for whole in wholes:  # stand-ins for ZeRO-3 parameters: the rank's partition in ds_tensor, the size in ds_numel
        p = torch.nn.Parameter(torch.zeros(0))
        part = math_ceil(whole.numel(), world)
        padded = torch.cat([whole.reshape(-1), torch.zeros(part * world - whole.numel())])
        p.ds_numel, p.ds_tensor = whole.numel(), padded[rank * part:(rank + 1) * part].clone()
        params.append(p)
    return CaptionEMA([torch.nn.ParameterList(params)], decay=0.5)


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (3, 2)])
def test_the_caption_ema_is_kept_and_cut_into_the_new_partitions(old, new):
    wholes = [torch.arange(7.0), torch.arange(12.0).reshape(3, 4) + 100, torch.tensor([5.0])]
    saved = [_ema_on(old, r, wholes).state_dict() for r in range(old)]
    for r in range(new):
        ema = _ema_on(new, r, [torch.zeros_like(w) for w in wholes])
        ema.load_resharded(saved, r)
        want = _ema_on(new, r, wholes).shadow
        for got, expected in zip(ema.shadow, want):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_caption_ema_follows_its_weights_by_name_across_zero_stages():
    """Saved on 2 ZeRO-3 ranks, where the persistent weight `b` was left live (not averaged), loaded by a ZeRO-2 run
    (whole weights, `b` averaged too): `a` and `c` keep their averages, `b` starts from its live value; and back, a
    weight the loading run does not average is dropped."""
    wholes = {"a": torch.arange(7.0), "c": torch.arange(12.0).reshape(3, 4) + 100}

    def zero3(rank: int) -> CaptionEMA:
        ema = _ema_on(2, rank, list(wholes.values()))
        ema.names = list(wholes)
        return ema

    live_b = torch.tensor([5.0, 6.0])
    whole = {"a": torch.nn.Parameter(torch.zeros(7)), "b": torch.nn.Parameter(live_b.clone()),
             "c": torch.nn.Parameter(torch.zeros(3, 4))}
    zero2 = CaptionEMA([torch.nn.ParameterDict(whole)], decay=0.5, names={id(p): n for n, p in whole.items()})
    zero2.load_resharded([zero3(r).state_dict() for r in range(2)], 0)
    assert zero2.names == ["a", "b", "c"]
    for got, want in zip(zero2.shadow, (wholes["a"], live_b, wholes["c"])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    back = zero3(1)
    back.shadow = [torch.zeros_like(s) for s in back.shadow]
    back.load_resharded([zero2.state_dict()], 1)  # b is not among its weights
    for got, want in zip(back.shadow, zero3(1).shadow):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


PATIENT_WORKER = r'''
import sys, time
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
from dualloop.train import reshard

# a default group that gives up after 3 s (NCCL's is 30 min), and a conversion that takes 6 s
dist.init_process_group("gloo", timeout=timedelta(seconds=3))
reshard.CONVERSION_POLL_S = 0.5
reshard._convert_once = lambda ckpt, saved, stage, home, change: time.sleep(6) or "converted (slowly)"
reshard.conversion_matches = lambda ckpt, home=None: True
print(f"rank {dist.get_rank()}: {reshard.prepare_resume(Path(sys.argv[1]), 2, stage=3)}", flush=True)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_the_ranks_wait_for_a_conversion_longer_than_the_process_group_timeout(tmp_path):
    """Rank 0 converts while the others wait: a big checkpoint's conversion can outlast the process group's
    timeout, so the ranks meet in a small collective every CONVERSION_POLL_S meanwhile."""
    ckpt = _fake_checkpoint(tmp_path / "ckpts", 1)
    worker = tmp_path / "patient.py"
    worker.write_text(PATIENT_WORKER)
    code, log = _launch(torchrun(worker, ckpt, nproc=2), timeout=120)
    assert code == 0, log
    assert "rank 0: 1" in log and "rank 1: 1" in log
