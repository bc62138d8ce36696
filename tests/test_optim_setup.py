"""The optimization setup as HF Trainer / DeepSpeed users expect it: the logged lr is the one the step used, the CPU's
client optimizer gets the ds_config optimizer section's hyper-parameters (as FusedAdam does on the GPU), and
out-of-range schedule values are config errors. The trainer runs once in a subprocess (DeepSpeed's state is global):
tiny model, ZeRO-3, CPU, fp32, 2 micro-batches per step."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dualloop.config import ConfigError, TrainConfig
from dualloop.train.engine import client_adam, fill_ds_config, load_ds_config, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
STEPS, LR, WARMUP_RATIO, MIN_LR_RATIO = 4, 1e-3, 0.5, 0.1

WORKER = r'''
import json, sys
import torch
from dualloop.config import load_config
from dualloop.train.trainer import Trainer

tr = Trainer(load_config(sys.argv[1]))
opt = tr.engine.basic_optimizer
summary = tr.fit()
lrs = [json.loads(line)["lr"] for line in open(summary["metrics_path"])]
print("RESULT " + json.dumps({"optimizer": type(opt).__name__, "eps": [g["eps"] for g in opt.param_groups],
                              "decoupled": [g.get("decoupled_weight_decay") for g in opt.param_groups],
                              "weight_decay": sorted(g["weight_decay"] for g in opt.param_groups), "lr": lrs}))
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A short training run with a user ds_config that asks for L2 Adam with eps 1e-6 (DeepSpeed's "Adam" with
    adam_w_mode false: FusedAdam on the GPU) and a warmup + cosine schedule; returns what the worker saw."""
    from dualloop.data import write_synthetic_corpus

    tmp = tmp_path_factory.mktemp("optim")
    data = yaml.safe_load(open(write_synthetic_corpus(tmp / "corpus", seed=0)["config"]))["data"]
    ds = load_ds_config("zero3_bf16")
    ds["optimizer"] = {"type": "Adam", "params": {"lr": "auto", "betas": "auto", "eps": 1e-6,
                                                  "weight_decay": "auto", "adam_w_mode": False}}
    (tmp / "ds.json").write_text(json.dumps(ds))
    cfg = {"model": {"preset": "tiny"}, "data": {**data, "num_workers": 0},
           "loop": {"caption": {"max_new_tokens": 2}, "loss": {"backend": "torch"}},
           "train": {"output_dir": str(tmp / "run"), "steps": STEPS, "micro_batch_size": 1, "grad_accum": 2,
                     "lr": LR, "warmup_ratio": WARMUP_RATIO, "min_lr_ratio": MIN_LR_RATIO, "precision": "fp32",
                     "ds_config": str(tmp / "ds.json"), "save_every": 100, "progress_bar": False,
                     "tensorboard": False}}
    return run_worker(tmp, cfg, WORKER)


def run_worker(tmp: Path, cfg: dict, worker: str) -> dict:
    """Run the script `worker` on the config `cfg` in a fresh single-process CPU environment (no launcher variables
    inherited); the JSON it printed after "RESULT "."""
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "worker.py").write_text(worker)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(tmp / "worker.py"), str(tmp / "cfg.yaml")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_logged_lr_is_the_lr_the_step_used(run):
    """metrics.jsonl's `lr` at step k is the lr of step k's update (HF Trainer's `learning_rate`): 1/warmup of the
    peak at step 1, not the next step's value (which made the log look one step ahead, reaching the floor at the
    last step although that step still trained above it). One scheduler step per optimizer step (grad_accum 2)."""
    warmup = math.ceil(WARMUP_RATIO * STEPS)
    expected = [LR * warmup_cosine(s, total=STEPS, warmup=warmup, min_ratio=MIN_LR_RATIO) for s in range(STEPS)]
    assert run["lr"] == pytest.approx(expected, rel=1e-9)
    assert run["lr"][0] == pytest.approx(LR / warmup)


def test_cpu_client_optimizer_takes_the_ds_config_optimizer_section(run):
    """On the GPU DeepSpeed builds FusedAdam from the JSON section (eps, adam_w_mode); the CPU's client torch
    optimizer must train the same way, not a default AdamW with eps 1e-8 and decoupled decay."""
    assert run["optimizer"] == "Adam"
    assert run["eps"] == [1e-6, 1e-6] and run["decoupled"] == [False, False]
    assert run["weight_decay"] == [0.0, 0.05]  # biases and norms undecayed, as on the GPU


def _gpu_path_optimizer(ds_gpu: dict, params):
    """What DeepSpeed's _configure_basic_optimizer builds from the filled GPU config (its torch_adam branch: the
    same hyper-parameters FusedAdam gets, on the CPU)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    spec = ds_gpu["optimizer"]
    p = dict(spec["params"], torch_adam=True)
    adam_w_mode = p.pop("adam_w_mode", True)
    adam_w_mode = spec["type"].lower() == "adamw" or adam_w_mode
    cls, extra = DeepSpeedEngine.get_optimizer_configuration(None, p, adam_w_mode)
    return cls(params, **p, **extra)


@pytest.mark.parametrize("section", [
    {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": 1e-6, "weight_decay": "auto"}},
    {"type": "Adam", "params": {"lr": "auto", "betas": "auto", "eps": 1e-8, "weight_decay": "auto"}},
    {"type": "Adam", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto", "adam_w_mode": False}},
])
def test_cpu_and_gpu_optimizers_make_the_same_updates(section):
    train = TrainConfig(lr=1e-2, weight_decay=0.1, adam_betas=[0.8, 0.95])
    ds = dict(load_ds_config("zero3_bf16"), optimizer=section)
    ds_gpu = fill_ds_config(ds, train, world_size=1, device="cuda")
    cls, kwargs = client_adam(section, train)
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opts = [_gpu_path_optimizer(ds_gpu, [a]), cls([b], **kwargs)]
    for _ in range(3):
        g = torch.randn(4, 3)
        for p, o in zip((a, b), opts):
            p.grad = g.clone()
            o.step()
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_optimizer_sections_torch_cannot_honour_are_config_errors():
    train = TrainConfig()
    ds = load_ds_config("zero3_bf16")
    with pytest.raises(ConfigError, match="Lamb"):
        fill_ds_config(dict(ds, optimizer={"type": "Lamb", "params": {}}), train, world_size=1, device="cpu")
    with pytest.raises(ConfigError, match="bias_correction"):
        fill_ds_config(dict(ds, optimizer={"type": "AdamW", "params": {"bias_correction": False}}), train,
                       world_size=1, device="cpu")


@pytest.mark.parametrize("field,value", [("warmup_ratio", 1.5), ("warmup_ratio", -0.1), ("min_lr_ratio", 2.0),
                                         ("lr", 0.0), ("weight_decay", -0.01)])
def test_out_of_range_optimizer_settings_are_config_errors(field, value):
    train = TrainConfig()
    setattr(train, field, value)
    with pytest.raises(ConfigError, match=field):
        fill_ds_config(load_ds_config("zero3_bf16"), train, world_size=1, device="cuda")
