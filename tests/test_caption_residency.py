"""Where the captioning weights live between the caption phase and the optimizer step under ZeRO-3.

Gathered once for the caption phase, they stay whole until the optimizer step (`loop.caption.keep_gathered`): the
grounding forward and backward then fetch none of them again - as after per-layer gathering, whose fetches ZeRO-3
keeps - and the optimizer step still releases every parameter. The losses are those of releasing after the phase.
A caption EMA must not be bypassed by weights that are whole when it is swapped in. Two ZeRO-3 ranks (gloo).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_train_dist import _launch, torchrun  # a 2-rank launch with a clean environment

pytestmark = pytest.mark.slow

WORKER = r'''
import collections, json, sys
import torch
from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
import dualloop.loop.step as step_module
from dualloop.config import load_config
from dualloop.train.trainer import Trainer

phase = ["other"]
vlm_ids = set()
fetched = collections.Counter()  # captioning-weight all-gathers by ZeRO-3's coordinator, per phase
coordinator = ppc.PartitionedParameterCoordinator
gather = coordinator._PartitionedParameterCoordinator__all_gather_params
def spy(self, params, forward):
    fetched[phase[0]] += sum(id(p) in vlm_ids for p in params)
    return gather(self, params, forward)
coordinator._PartitionedParameterCoordinator__all_gather_params = spy
generate = step_module.DualLoopStep._generate
def tagged(self, *a, **k):
    phase[0] = "caption"
    try:
        return generate(self, *a, **k)
    finally:
        phase[0] = "ground"
step_module.DualLoopStep._generate = tagged

tr = Trainer(load_config(sys.argv[1]))
vlm = [p for m in tr.model.vision_language_modules() for p in m.parameters()]
vlm_ids.update(id(p) for p in vlm)
out = {"loss": [], "ground_fetches": [], "partitioned_after_step": []}
for step in range(3):
    fetched.clear()
    out["loss"].append(tr.train_step(step)["loss"])
    out["ground_fetches"].append(fetched["ground"])
    # ZeRO-3's persistent parameters (tiny ones) are whole at all times: DeepSpeed refreshes them after a step
    out["partitioned_after_step"].append(all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in vlm
                                             if not p.ds_persist))

# a caption EMA whose values are the live ones + 1: weights that are whole when it is swapped in (fetched and kept
# by an earlier phase) must be gathered again from the swapped partitions (with one rank the whole weights alias
# the partition, so only 2+ ranks can tell)
from dualloop.train.ema import CaptionEMA
from dualloop.train.generation import caption_phase
ema = CaptionEMA(tr.model.vision_language_modules(), 0.5)
with torch.no_grad():
    for s in ema.shadow:
        s.add_(1.0)
ema.params[0].all_gather(param_list=ema.params)  # whole, live values
live = [p.data.detach().clone() for p in ema.params]
with ema.swapped_in(), caption_phase(tr.engine, tr.model.vision_language_modules(), "once", tr.device):
    seen = [bool(torch.equal(p.data, v + 1)) for p, v in zip(ema.params, live)]
out["ema_seen_in_phase"] = all(seen) and len(seen) > 0
out["world"] = tr.world
if tr.rank == 0:
    json.dump(out, open(sys.argv[2], "w"))
from dualloop.distributed import leave_together
leave_together()
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


def _run(tmp_path, corpus, keep: bool, cuda: bool = False, whole_step: bool = False, ema: float | None = None,
         grad_accum: int = 1) -> dict:
    name = f"keep{int(keep)}_whole{int(whole_step)}_ema{ema}_ga{grad_accum}"
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "data": {**corpus, "num_workers": 0},
        "loop": {"caption": {"max_new_tokens": 4, "gather": "once", "keep_gathered": keep, "ema_decay": ema},
                 "loss": {"backend": "torch", "caption": 1.0}},
        "train": {"output_dir": str(tmp_path / f"run_{name}"), "steps": 3, "save_every": 1000, "resume": "none",
                  "micro_batch_size": 2, "grad_accum": grad_accum, "lr": 1e-3, "warmup_ratio": 0.0,
                  "ds_config": "zero3_bf16", "precision": "fp32", "progress_bar": False, "tensorboard": False,
                  "zero3_whole_step": whole_step}}))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = tmp_path / f"result_{name}.json"
    if cuda:  # one process on the GPU (and the CUDA-graph decoding that holds the gathered weights' addresses)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT",
                                                                 "DS_ACCELERATOR", "TRITON_INTERPRET")}
        proc = subprocess.run([sys.executable, str(worker), str(cfg), str(result)], env=env, capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    else:
        rc, log = _launch(torchrun(worker, cfg, result), timeout=300)
        assert rc == 0, log[-6000:]
    return json.loads(result.read_text())


def test_gathered_weights_stay_whole_until_the_optimizer_step(corpus, tmp_path):
    kept, released = _run(tmp_path, corpus, True), _run(tmp_path, corpus, False)
    assert kept["world"] == released["world"] == 2
    assert kept["loss"] == released["loss"]  # where the weights live changes no number
    assert kept["ground_fetches"][1:] == [0, 0]  # after the first step (ZeRO-3 records its trace): none fetched
    assert min(released["ground_fetches"][1:]) > 0  # released after the phase: fetched again
    assert all(kept["partitioned_after_step"]) and all(released["partitioned_after_step"])
    assert kept["ema_seen_in_phase"] and released["ema_seen_in_phase"]


@pytest.mark.parametrize("ema", [None, 0.5])
def test_whole_step_trains_the_same_without_module_hooks(corpus, tmp_path, ema):
    """train.zero3_whole_step: the whole model gathered once per optimizer step (2 accumulated micro-steps here),
    forward and backward without ZeRO-3's module hooks: the same losses as the default, ZeRO-3's coordinator
    fetches nothing, and the optimizer step leaves every weight partitioned. With a caption EMA the live weights
    come back after each caption phase."""
    default = _run(tmp_path, corpus, True, ema=ema, grad_accum=2)
    whole = _run(tmp_path, corpus, True, whole_step=True, ema=ema, grad_accum=2)
    assert whole["loss"] == pytest.approx(default["loss"], rel=1e-6)  # the same numbers (2 ranks: sums commute)
    assert whole["ground_fetches"] == [0, 0, 0]
    assert all(whole["partitioned_after_step"])


@pytest.mark.gpu
def test_held_weights_and_whole_step_on_cuda(corpus, tmp_path):
    kept, released = _run(tmp_path, corpus, True, cuda=True), _run(tmp_path, corpus, False, cuda=True)
    whole = _run(tmp_path, corpus, True, cuda=True, whole_step=True)
    assert kept["loss"] == pytest.approx(released["loss"], rel=1e-3)  # GPU backward kernels may add in any order
    assert whole["loss"] == pytest.approx(kept["loss"], rel=1e-3)
    assert kept["ground_fetches"][1:] == [0, 0] and min(released["ground_fetches"][1:]) > 0
    assert whole["ground_fetches"] == [0, 0, 0]
    assert all(r["partitioned_after_step"] for r in (kept, released, whole))
