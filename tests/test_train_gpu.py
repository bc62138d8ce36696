"""`dualloop train` on one GPU under each shipped DeepSpeed config (`make gpu-check`; skipped without CUDA): the tiny
dual loop for a few steps in bf16 with DeepSpeed's FusedAdam (CPU Adam with the optimizer offloaded), a checkpoint,
then a resume. The CPU tests run the same
code on gloo with a torch optimizer; here the GPU-only paths run: NCCL, FusedAdam, CUDA-graph caption decoding with
weights that are whole (ZeRO-2) or gathered once (ZeRO-3), the fused mask-loss kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]


def _train(tmp: Path, corpus: dict, ds_config: str, steps: int) -> tuple[int, str, str]:
    """rc, stdout (the run's JSON summary), stdout + stderr."""
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "data": {**{k: v for k, v in corpus.items() if k != "eval_datasets"}, "num_workers": 0},
        "loop": {"caption_grad": "gumbel", "caption": {"max_new_tokens": 4}},
        "train": {"output_dir": str(tmp / "run"), "micro_batch_size": 2, "steps": steps, "save_every": 2,
                  "ds_config": ds_config, "precision": "bf16", "progress_bar": False, "tensorboard": False},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "dualloop.train", "--config", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)
    return proc.returncode, proc.stdout, proc.stdout + proc.stderr


def _summary(stdout: str) -> dict:
    lines = stdout.splitlines()  # the summary: the last JSON object printed, its braces alone on their lines
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:lines.index("}", start) + 1]))


# every shipped config; zero3_offload_bf16 keeps the optimizer on the CPU (DeepSpeed's CPU Adam, JIT-built once)
@pytest.mark.parametrize("ds_config", ["zero3_bf16", "zero2_bf16", "zero3_offload_bf16"])
def test_train_and_resume_on_one_gpu(corpus, tmp_path, ds_config):
    rc, out, log = _train(tmp_path, corpus, ds_config, steps=2)
    assert rc == 0, log[-6000:]
    first = _summary(out)
    assert first["device"].startswith("cuda") and first["steps_run"] == 2 and first["skipped_steps"] == 0, first
    rc, out, log = _train(tmp_path, corpus, ds_config, steps=3)  # train.resume=auto: goes on from step 2
    assert rc == 0, log[-6000:]
    second = _summary(out)
    assert second["start_step"] == 2 and second["steps_run"] == 1 and second["skipped_steps"] == 0, second
