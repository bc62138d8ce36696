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
    with pytest.raises(ConfigError, match=r"did you mean 'train\.steps'"):
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
    # two smoke runs on one node must not both take deepspeed's default port 29500
    port = args[args.index("--master_port") + 1]
    assert int(port) > 0 and port != "29500"
    _, again = _run_script(tmp_path, "test_dual_loop.sh", MASTER_PORT="29612")
    assert again[again.index("--master_port") + 1] == "29612"
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
    assert args[-1] == "'train.grad_accum=2'"  # for pdsh: see test_multi_node_overrides_reach_every_node_unchanged
    r, _ = _run_script(tmp_path, "run_dual_loop_full.sh", HOSTFILE=str(hostfile))
    assert r.returncode != 0 and "MASTER_ADDR" in r.stderr


@pytest.mark.parametrize("hosts", [2, 1])
def test_multi_node_overrides_reach_every_node_unchanged(tmp_path, hosts):
    """pdsh gives each node's shell one command line, and deepspeed quotes only arguments with a space (in double
    quotes, where $ and ` still expand): `x={a,b}` became `x=a x=b`, `$HOME` the remote home. What the remote shell
    makes of deepspeed's real quoting of the script's arguments must be the overrides as typed. A one-host hostfile
    is started locally, with no shell in between: nothing quoted there."""
    from types import SimpleNamespace

    from deepspeed.launcher.multinode_runner import PDSHRunner

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=8\n" for i in range(1, hosts + 1)))
    overrides = ["train.steps=5", "model.lora.targets=[q_proj,v_proj]", "loop.x={a,b}", "train.output_dir=runs/it's",
                 "data.note=a \"quoted\" $HOME `id` \\ text", "x=*", "y=a\tb", "z=$(id)", "w=it's a \\$HOME"]
    r, args = _run_script(tmp_path, "run_dual_loop_full.sh", *overrides, HOSTFILE=str(hostfile), MASTER_ADDR="node1")
    assert r.returncode == 0, r.stderr
    user_args = args[args.index("dualloop.train") + 1:]
    if hosts == 1:
        assert user_args == ["--config", "configs/full_8gpu.yaml", *overrides]
        return
    remote = " ".join(PDSHRunner.parse_user_args(SimpleNamespace(args=SimpleNamespace(user_args=user_args))))
    seen = subprocess.run(["bash", "-c", f"printf '%s\\0' {remote}"], capture_output=True, text=True, check=True,
                          cwd=tmp_path, env={"HOME": "/elsewhere", "PATH": os.environ["PATH"]})
    assert seen.stdout.split("\0")[:-1] == ["--config", "configs/full_8gpu.yaml", *overrides]
