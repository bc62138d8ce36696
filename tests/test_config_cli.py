import os
import subprocess
from pathlib import Path

import pytest

from dualloop.cli import main as cli_main
from dualloop.config import ConfigError, load_config


def test_minimal_model_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: tiny}\n")
    cfg = load_config(p)
    assert cfg.model.preset == "tiny" and cfg.model.lora.r == 128


def test_unknown_key_names_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: tiny, lora: {rank: 4}}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.lora\.rank'"):
        load_config(p)
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(None, ["train.stepz=3"])


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "train.steps=7", "loop.caption_grad=gumbel"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.steps == 7 and cfg.loop.caption_grad == "gumbel"
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=many"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_usage_and_unknown(capsys):
    assert cli_main([]) == 0
    assert "verify-data" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2


# ---------------------------------------------------------------------------------------------------- launch scripts
REPO = Path(__file__).resolve().parents[1]


def _run_script(tmp_path, script: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run scripts/<script> with stub `deepspeed` (records its arguments), `ssh` (fails for $UNREACHABLE) and
    `dualloop` on PATH; (result, the arguments deepspeed got, [] when it was not called)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {"deepspeed": f'printf "%s\\n" "$@" > {tmp_path}/deepspeed_args',
             "ssh": 'for a in "$@"; do [ "$a" = "${UNREACHABLE:-}" ] && exit 255; done; exit 0',
             "dualloop": "exit 0"}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(env, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(REPO / "scripts" / script), *args], env=full_env, capture_output=True,
                            text=True, timeout=60)
    recorded = tmp_path / "deepspeed_args"
    return result, (recorded.read_text().splitlines() if recorded.exists() else [])


def test_launch_scripts_pass_overrides_and_pick_gpus(tmp_path):
    r, args = _run_script(tmp_path, "run_dual_loop_full.sh", "train.steps=5")
    assert r.returncode == 0, r.stderr
    assert args[:2] == ["--num_gpus", "8"] and args[-5:] == ["--module", "dualloop.train", "--config",
                                                              "configs/full_8gpu.yaml", "train.steps=5"]
    r, args = _run_script(tmp_path, "test_dual_loop.sh", "train.steps=20")
    assert r.returncode == 0, r.stderr
    assert args[:2] == ["--num_gpus", "1"] and args[-1] == "train.steps=20"
    # deepspeed's --num_gpus ignores CUDA_VISIBLE_DEVICES (and starts from GPU 0): the scripts name the GPUs instead
    r, args = _run_script(tmp_path, "test_dual_loop.sh", CUDA_VISIBLE_DEVICES="3,5")
    assert r.returncode == 0, r.stderr
    assert args[:2] == ["--include", "localhost:3"] and "--num_gpus" not in args
    r, args = _run_script(tmp_path, "run_dual_loop_full.sh", CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert args[:2] == ["--include", "localhost:4,5,6,7"]
    r, args = _run_script(tmp_path, "run_dual_loop_full.sh", CUDA_VISIBLE_DEVICES="4,5,6,7", NUM_GPUS="2")
    assert args[:2] == ["--include", "localhost:4,5"]


def test_multi_node_script_checks_the_hostfile_and_every_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    # a missing hostfile: deepspeed itself would warn and train on this node alone
    r, args = _run_script(tmp_path, "run_dual_loop_full.sh", HOSTFILE=str(hostfile), MASTER_ADDR="node1")
    assert r.returncode == 2 and "no such file" in r.stderr and not args
    hostfile.write_text((REPO / "scripts" / "hostfile.example").read_text())
    # deepspeed's own ssh check covers the first host only
    r, args = _run_script(tmp_path, "run_dual_loop_full.sh", HOSTFILE=str(hostfile), MASTER_ADDR="node1",
                          UNREACHABLE="node2")
    assert r.returncode == 2 and "node2" in r.stderr and not args
    r, args = _run_script(tmp_path, "run_dual_loop_full.sh", "train.grad_accum=2", HOSTFILE=str(hostfile),
                          MASTER_ADDR="node1")
    assert r.returncode == 0, r.stderr
    assert args[:6] == ["--hostfile", str(hostfile), "--master_addr", "node1", "--master_port", "29500"]
    assert args[-1] == "train.grad_accum=2"
    r, _ = _run_script(tmp_path, "run_dual_loop_full.sh", HOSTFILE=str(hostfile))
    assert r.returncode != 0 and "MASTER_ADDR" in r.stderr
