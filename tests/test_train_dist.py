"""The trainer under DeepSpeed ZeRO-3 on CPU (gloo), in subprocesses bounded by timeouts:

- 2 processes with deliberately different data per rank (sources, image sizes, captions or none, empty/full
  masks, rank 0's captions ending at once while rank 1's run to max_new_tokens), all three caption gather modes,
  a NaN injected on rank 0 only: no hang, identical module-call counts on both ranks, identical parameters on both
  ranks after gathering, the NaN step skipped on both (parameters untouched) and training going on after it;
- kill -9 mid-run, resume: the same loss trajectory as the uninterrupted run (same data order, same noise, the
  caption EMA restored), then `dualloop export` of the result.
Both runs caption with an EMA teacher (loop.caption.ema_decay) in gumbel mode.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from process_tree import kill_tree, output_after_kill

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 420


def _env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # never inherit a process group from the test process
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2) -> list[str]:
    """A torchrun command line. `--standalone`: the launcher binds a free port itself, so no other process can take
    it between our choosing a port and the launcher binding it."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *map(str, args)]


def _launch(cmd, timeout: int = TIMEOUT) -> tuple[int | None, str]:
    """Run a launcher in its own session; (returncode, stdout+stderr), returncode None on timeout (the whole process
    group is killed). `cmd` is a command line, or make_cmd(port) for launchers given a port (deepspeed's): retried
    on a fresh port when another process took ours."""
    make_cmd = cmd if callable(cmd) else (lambda port: cmd)
    for _ in range(3):
        proc = subprocess.Popen(make_cmd(_free_port()), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)  # the launcher and its workers (torchrun's are in sessions of their own)
            return None, output_after_kill(proc)
        if proc.returncode != 0 and ("EADDRINUSE" in out or "address already in use" in out.lower()):
            continue
        return proc.returncode, out
    return proc.returncode, out


def _run_worker_on_two_ranks(tmp_path: Path, source: str, cfg: Path, result: Path) -> str:
    """Run a worker script (`source`: argv config, result path, seconds before it dumps its stacks) on 2 ranks with
    torchrun; fails on a hang or an error, returns the log."""
    worker = tmp_path / "worker.py"
    worker.write_text(source)
    rc, log = _launch(torchrun(worker, cfg, result, TIMEOUT - 60))
    if rc is None:
        pytest.fail(f"2-rank ZeRO-3 run did not finish in {TIMEOUT}s (hang?):\n{log[-5000:]}")
    assert rc == 0, log[-8000:]
    return log


def _write_config(path: Path, data: dict, out: Path, ema_decay: float | None = None, **train) -> Path:
    cfg = {
        "model": {"preset": "tiny"},
        "data": {**data, "num_workers": 0},
        "loop": {"caption_grad": "gumbel", "gumbel_topk": 16, "caption": {"max_new_tokens": 4, "ema_decay": ema_decay},
                 "loss": {"backend": "torch", "caption": 1.0}},
        "train": {"output_dir": str(out), "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3, "warmup_ratio": 0.0,
                  "ds_config": "zero3_bf16", "progress_bar": False, "tensorboard": False, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


WORKER = r'''
import collections, faulthandler, hashlib, json, sys
faulthandler.dump_traceback_later(int(sys.argv[3]), exit=True)  # a hang prints every stack and exits
import torch
import torch.distributed as dist
import deepspeed
from dualloop.config import load_config
from dualloop.train.trainer import Trainer

cfg_path, out_path = sys.argv[1], sys.argv[2]
tr = Trainer(load_config(cfg_path))
rank = tr.rank
assert tr.world == 2 and tr.zero3


def crafted(kind):
    g = torch.Generator().manual_seed(kind)
    if kind == 0:
        sizes, src, caps = [(64, 64), (64, 64)], ["refcoco", "refcoco"], [["the red circle"], ["a blue square"]]
    else:
        sizes, src, caps = [(40, 56), (72, 48)], ["sav", "sa1b"], [[], []]
    b = {"image1": [], "mask1": [], "image2": [], "mask2": [], "captions": caps, "source": src,
         "key": ["a", "b"], "paired": torch.tensor([kind == 1, False])}
    for i, (h, w) in enumerate(sizes):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        m = torch.zeros(h, w, dtype=torch.uint8)
        if kind == 0:
            m[h // 4: h // 2, w // 4: w // 2] = 1
            m2 = torch.zeros_like(m) if i == 0 else m
        else:
            m[0, 0] = 1
            m2 = torch.ones_like(m)
        # rank 1's first sample is a video pair (another image2): the frozen tower's one call per step then
        # takes 3 images there and 2 on rank 0, and the ranks must still gather in step
        img2 = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) if kind == 1 and i == 0 else img
        b["image1"].append(img); b["mask1"].append(m); b["image2"].append(img2); b["mask2"].append(m2)
    return b


batch = crafted(rank)
tr._next_batch = lambda: batch  # deliberately different data on each rank

eos = tr.model.eos_token_id
if rank == 0:  # rank 0's captions end at the first token; rank 1 generates max_new_tokens
    def boost(mod, args, out):
        if not torch.is_grad_enabled():
            out = out.clone()
            out[..., eos] += 1e4
        return out
    tr.model.vlm.lm_head.register_forward_hook(boost)

counts = collections.Counter()
names = {m: n for n, m in tr.model.named_modules()}
for m in tr.model.modules():
    m.register_forward_pre_hook(lambda mod, args: counts.update([names[mod]]))

caption_lengths = []
inner_step = tr.step_fn.__call__
class Spy:
    def __call__(self, b, g):
        out = inner_step(b, g)
        caption_lengths.append(out.values["caption_len"].tolist())
        return out
tr.step_fn = Spy()


def digest():
    params = list(tr.model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        h = hashlib.sha256()
        for p in params:
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


modes = ["once", "per_layer", "auto", "once"]
digests, skipped, traces, decodings = [], [], [], []
offload = tr.engine.optimizer.parameter_offload
hooks_at_start = (len(offload.forward_hooks), len(offload.backward_hooks))
orig = tr.train_step
def train_step(step):
    tr.cfg.loop.caption.gather = modes[step]
    digests.append(digest())
    rec = orig(step)
    skipped.append(rec["skipped"])
    traces.append(offload.get_param_coordinator().is_complete_trace())
    decodings.append(tr.model.last_decoding)
    return rec
tr.train_step = train_step
from dualloop.train.trainer import TrainingAborted
try:
    summary = tr.fit()
except TrainingAborted as e:  # too many consecutive skips: every rank aborts at the same step
    summary = {"aborted": str(e)}
digests.append(digest())
ema_digest, restored = None, True
if tr.ema is not None:
    with tr.ema.swapped_in():  # the caption EMA (ZeRO-3 partitions): differs from the live weights, restored after
        ema_digest = digest()
    restored = digest() == digests[-1]

mine = {"counts": dict(counts), "digests": digests, "skipped": skipped, "caption_lengths": caption_lengths,
        "ema_digest": ema_digest, "ema_restored": restored, "traces": traces, "decodings": decodings,
        "hooks": [hooks_at_start, (len(offload.forward_hooks), len(offload.backward_hooks))]}
everyone = [None, None]
dist.all_gather_object(everyone, mine)
if rank == 0:
    json.dump({"ranks": everyone, "summary": summary}, open(out_path, "w"))
from dualloop.distributed import leave_together
leave_together()  # barrier + destroy: a rank exiting alone can abort at exit
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


@pytest.mark.parametrize("mode", ["gumbel", "reinforce"])
def test_two_ranks_different_data_no_hang_equal_work_nan_skip(corpus, tmp_path, mode):
    out = tmp_path / "run"
    # gumbel: one NaN step, skipped, training goes on; reinforce: two in a row = max_consecutive_skips -> abort
    nan_steps = [1] if mode == "gumbel" else [1, 2]
    cfg = _write_config(tmp_path / "cfg.yaml", corpus, out, steps=4, save_every=100, debug_nan_steps=nan_steps,
                        max_consecutive_skips=2, ema_decay=0.5 if mode == "gumbel" else None)
    if mode == "reinforce":  # K=2 sampled captions, self-critical greedy baseline, KL to the adapter-free policy
        tree = yaml.safe_load(cfg.read_text())
        tree["loop"].update(caption_grad="reinforce", reinforce_samples=2, reinforce_baseline="greedy",
                            reinforce_kl=0.1)
        cfg.write_text(yaml.safe_dump(tree))
    result = tmp_path / "result.json"
    _run_worker_on_two_ranks(tmp_path, WORKER, cfg, result)
    r = json.loads(result.read_text())
    a, b = r["ranks"]
    # the data really differed: rank 0's captions were empty, rank 1's ran to the limit
    assert all(x == [0.0, 0.0] for x in a["caption_lengths"])
    assert all(min(x) > 0 for x in b["caption_lengths"]), b["caption_lengths"]
    assert a["counts"] == b["counts"]  # same module calls, generation steps included (synced_gpus)
    assert a["digests"] == b["digests"]  # identical parameters on both ranks at every step boundary
    assert a["hooks"][0] == a["hooks"][1]  # hooks removed for the caption phase were all put back, none doubled
    # weights gathered for the phase: static KV cache (a CUDA graph on a GPU); fetched per layer: dynamic
    expected = ["static", "dynamic", "static", "static"][: len(a["decodings"])]
    assert a["decodings"] == b["decodings"] == expected
    d = a["digests"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["skip_reason"] == "non-finite loss"
    if mode == "reinforce":
        assert a["skipped"] == b["skipped"] == [False, True, True]  # NaN on rank 0 only: both skip, then abort
        assert d[0] != d[1] and d[1] == d[2] == d[3]
        assert "2 consecutive steps" in r["summary"]["aborted"]
        assert [x["skipped"] for x in lines] == [False, True, True]
        return
    assert a["skipped"] == b["skipped"] == [False, True, False, False]  # NaN on rank 0 only: both skip
    assert d[0] != d[1] and d[1] == d[2] and d[2] != d[3] != d[4]  # the skipped step left the weights alone
    assert a["ema_restored"] and b["ema_restored"] and a["ema_digest"] == b["ema_digest"] != d[-1]
    # with the weights gathered once (hooks off) the module trace is the same every step: recorded, then complete
    # (prefetching on); it need not hold across per_layer steps, whose generation runs through the hooks
    assert a["traces"][-1] and b["traces"][-1]
    s = r["summary"]
    assert s["skipped_steps"] == 1 and s["world_size"] == 2 and s["steps_run"] == 4
    assert [x["skipped"] for x in lines] == [False, True, False, False]
    assert set(lines[0]["per_dataset"]) == {"refcoco", "sav", "sa1b"}  # per-dataset components from both ranks
    assert lines[0]["per_dataset"]["refcoco"]["samples"] == 2 and "caption_loss" in lines[0]["per_dataset"]["refcoco"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def _summary(stdout: str) -> dict:
    """The summary JSON `dualloop train` prints last (launchers print other things before it)."""
    start = stdout.rindex("\n{\n") + 1 if "\n{\n" in stdout else stdout.index("{")
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_kill_and_resume_continues_the_same_trajectory(corpus, tmp_path):
    steps = 6
    cmd = lambda cfg: [sys.executable, "-m", "dualloop.train", "--config", str(cfg), "--local_rank=0"]
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref_cfg = _write_config(tmp_path / "ref.yaml", corpus, ref_out, steps=steps, save_every=2, ema_decay=0.5)
    cut_cfg = _write_config(tmp_path / "cut.yaml", corpus, cut_out, steps=steps, save_every=2, ema_decay=0.5)

    # the interrupted run: SIGKILL once step 3 is logged (checkpoint of step 2 written, step 4 not reached)
    err_log = tmp_path / "cut_stderr.log"
    with open(err_log, "w") as err:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(cmd(cut_cfg), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    metrics = cut_out / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"run ended before the kill (rc {proc.returncode}): " \
                                               f"{err_log.read_text()[-3000:]}"
    killed_at = len(metrics.read_text().splitlines())
    latest = (cut_out / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step_00000002", "step_00000004") and killed_at < steps, (latest, killed_at)

    resumed = subprocess.run(cmd(cut_cfg), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, f"resumed run failed:\n{resumed.stderr[-5000:]}"
    assert "resumed from" in resumed.stderr and latest in resumed.stderr
    summary = _summary(resumed.stdout)
    assert summary["start_step"] == int(latest.split("_")[1])

    # the uninterrupted reference goes through the deepspeed launcher (`deepspeed --module dualloop.train`, which
    # passes --local_rank): the same code as `python -m dualloop.train` / `dualloop train`
    rc, log = _launch(lambda port: [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                                    "--master_port", str(port), "--module", "dualloop.train", "--config",
                                    str(ref_cfg)])
    assert rc == 0, f"reference run (deepspeed launcher) failed:\n{log[-5000:]}"
    assert _summary(log)["world_size"] == 1
    a, b = _losses(ref_out), _losses(cut_out)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
    for (s, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-6), f"step {s}: {la} uninterrupted vs {lb} resumed"
    assert len({round(x, 6) for _, x in a}) > 1  # the run actually trained (losses move)

    _check_export(cut_out, tmp_path / "export")


def fixed_inputs(model):
    """Two images with a region each and two captions, the same every call: for comparing models' outputs."""
    import torch

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g) for _ in range(2)]
    masks = [torch.zeros(64, 64, dtype=torch.uint8) for _ in range(2)]
    masks[0][10:30, 10:30] = 1
    masks[1][40:60, 5:20] = 1
    ids, lengths = model.encode_captions(["the red circle on the left", "a blue square"])
    return images, masks, ids, lengths


def _check_export(run_dir: Path, out: Path) -> None:
    """`dualloop export`: one safetensors model with LoRA merged, equal in output to the checkpoint's weights;
    transformers-format vlm/ + sam2/ directories load with the `pretrained` preset."""
    import torch

    from dualloop.config import ModelConfig, load_config
    from dualloop.model import build_model, load_model
    from dualloop.train.export import adopt_exported_parts, consolidated_state_dict, load_trained_model, main

    assert main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["lora_layers_merged"] > 0 and info["checkpoint"].endswith("step_00000006")
    ckpt = Path(info["checkpoint"])
    reference = build_model(load_config(ckpt / "config.yaml").model)  # LoRA unmerged, checkpoint weights
    reference.load_state_dict(consolidated_state_dict(ckpt), strict=False)
    exported = load_model(out)
    from_ckpt = load_trained_model(run_dir)  # what `dualloop eval --checkpoint RUN` uses
    assert not any(".lora_" in n for n, _ in exported.named_parameters())
    images, masks, ids, lengths = fixed_inputs(reference)
    for m in (reference, exported):
        m.eval()
    with torch.no_grad():
        a = reference.ground(images, caption_ids=ids, caption_lengths=lengths).logits
        b = exported.ground(images, caption_ids=ids, caption_lengths=lengths).logits
        ca = reference.caption_logits(images, masks, ids, lengths)
        cb = exported.caption_logits(images, masks, ids, lengths)
        c = from_ckpt.ground(images, caption_ids=ids, caption_lengths=lengths).logits
        d = load_trained_model(out).ground(images, caption_ids=ids, caption_lengths=lengths).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c, a)
    torch.testing.assert_close(d, b)
    torch.testing.assert_close(cb, ca, atol=1e-4, rtol=1e-4)
    pre = build_model(ModelConfig(preset="pretrained", vlm_path=info["vlm_path"], sam2_path=info["sam2_path"]))
    assert adopt_exported_parts(pre, info["vlm_path"])  # trained new-token rows and [SEG] projection
    pre.eval()
    with torch.no_grad():  # LoRA adapters of the fresh preset start at B = 0: the same function as the export
        e = pre.ground(images, caption_ids=ids, caption_lengths=lengths).logits
        ce = pre.caption_logits(images, masks, ids, lengths)
    torch.testing.assert_close(e, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ce, cb, atol=1e-4, rtol=1e-4)
    merged = dict(exported.named_parameters())  # the LLM's base weights there are the LoRA-merged ones
    compared = 0
    for name, p in pre.named_parameters():
        if name.startswith("vlm.model.language_model.layers.") and ".lora_" not in name:
            torch.testing.assert_close(p.detach(), merged[name.replace(".base_layer", "")].detach())
            compared += 1
    assert compared > 0


SHM_WORKER = r'''
import glob, json, os, sys
import torch
import deepspeed.comm as ds_comm
from dualloop.train.engine import init_distributed
rank, world = init_distributed("cpu")
port = os.environ["MASTER_PORT"]
built = ds_comm.comm.cdb.shm_comm_op is not None
t = torch.full((4,), float(rank + 1))
ds_comm.inference_all_reduce(t)  # DeepSpeed's shared-memory all-reduce: still works after the names are gone
torch.distributed.barrier()
left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:  # not stdout: the ranks' lines interleave
    json.dump({"rank": rank, "world": world, "built": built, "sum": t.tolist(), "left": left}, fh)
from dualloop.distributed import leave_together
leave_together()  # barrier + destroy: a rank exiting alone can abort at exit
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_cpu_runs_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce buffer (~66 MB of RAM per rank in /dev/shm) is unlinked once all ranks mapped it."""
    worker = tmp_path / "shm_worker.py"
    worker.write_text(SHM_WORKER)
    rc, log = _launch(torchrun(worker, tmp_path), timeout=180)
    assert rc == 0, log[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world"] == 2 for r in results)
    assert all(r["built"] for r in results)  # the buffer existed: DeepSpeed's shm op was set up
    assert all(r["sum"] == [3.0] * 4 for r in results)
    assert all(r["left"] == [] for r in results)


LEAF_WORKER = r'''
import json, sys
from dualloop.config import load_config
from dualloop.train.trainer import Trainer
tr = Trainer(load_config(sys.argv[1]))
from deepspeed.utils import get_z3_leaf_modules
losses = [tr.train_step(s)["loss"] for s in range(3)]
json.dump({"losses": losses, "leaves": sorted({type(m).__name__ for m in get_z3_leaf_modules(tr.model)})},
          open(sys.argv[2], "w"))
from dualloop.distributed import leave_together
leave_together()  # barrier + destroy: a rank exiting alone can abort at exit
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


def test_blocks_fetched_whole_train_the_same(corpus, tmp_path):
    """ZeRO-3 leaf blocks (train.zero3_leaf_modules) give the losses of per-module fetching, with trainable LLM
    layers, ViT layers and Hiera blocks fed by frozen parts (their inputs would otherwise carry no gradient)."""
    worker = tmp_path / "leaf_worker.py"
    worker.write_text(LEAF_WORKER)
    out = {}
    for leaves in (["auto"], []):
        name = "auto" if leaves else "none"
        cfg = _write_config(tmp_path / f"{name}.yaml", corpus, tmp_path / name, zero3_leaf_modules=leaves, steps=3)
        tree = yaml.safe_load(cfg.read_text())
        tree["model"]["train"] = {"llm_base": True, "vision_encoder": True, "sam2_image_encoder": True,
                                  "projector": False, "new_token_rows": False}
        cfg.write_text(yaml.safe_dump(tree))
        cmd = [sys.executable, str(worker), str(cfg), str(tmp_path / f"{name}.json")]
        rc, log = _launch(lambda port, cmd=cmd: cmd, timeout=240)
        assert rc == 0, log[-4000:]
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert out["auto"]["leaves"] == ["InternVLVisionLayer", "Qwen2DecoderLayer", "Sam2MultiScaleBlock"]
    assert out["none"]["leaves"] == []
    assert out["auto"]["losses"] == pytest.approx(out["none"]["losses"], rel=1e-5)
    assert len(set(out["auto"]["losses"])) == 3  # the weights really changed between steps


def _wait_for_lines(path: Path, n: int, proc, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines (process rc {proc.poll()})")


def test_sigterm_stops_after_the_step_with_a_checkpoint_then_resumes(corpus, tmp_path):
    """SIGTERM to the run's whole process tree (what the deepspeed launcher and SLURM do), DataLoader workers
    included: the step in flight finishes, a checkpoint of it is saved although save_every is far, the process exits
    with 143 naming the step, and the same command resumes there."""
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "cfg.yaml", corpus, out, steps=40, save_every=100)
    tree = yaml.safe_load(cfg.read_text())
    tree["data"]["num_workers"] = 1
    cfg.write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "dualloop.train", "--config", str(cfg)]
    err_log = tmp_path / "stderr.log"
    with open(err_log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        _wait_for_lines(out / "metrics.jsonl", 2, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = err_log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    steps_done = len((out / "metrics.jsonl").read_text().splitlines())
    assert 2 <= steps_done < 40
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps_done:08d}" and (out / "checkpoints" / latest / "COMPLETE").is_file()
    assert f"stopped by SIGTERM after step {steps_done}" in log and "rerun the same command" in log

    tree["train"]["steps"] = steps_done + 2
    cfg.write_text(yaml.safe_dump(tree))
    resumed = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert _summary(resumed.stdout)["start_step"] == steps_done
    assert [s for s, _ in _losses(out)] == list(range(1, steps_done + 3))


STOP_WORKER = r'''
import faulthandler, json, os, sys
faulthandler.dump_traceback_later(int(sys.argv[3]), exit=True)
from dualloop.config import load_config
from dualloop.train.trainer import Trainer, TrainingStopped

cfg_path, out_dir = sys.argv[1], sys.argv[2]
tr = Trainer(load_config(cfg_path))
with open(os.path.join(out_dir, f"pid{tr.rank}"), "w") as fh:
    fh.write(str(os.getpid()))
try:
    tr.fit()
    result = {"stopped": None}
except TrainingStopped as e:
    result = {"stopped": e.step, "signal": e.signum, "checkpoint": str(e.checkpoint)}
with open(os.path.join(out_dir, f"rank{tr.rank}.json"), "w") as fh:
    json.dump(result, fh)
from dualloop.distributed import leave_together
leave_together()  # barrier + destroy: a rank exiting alone can abort at exit
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


def test_a_signal_on_one_rank_stops_both_at_the_same_step(corpus, tmp_path):
    """Only rank 1 gets SIGTERM: both ranks agree at the next step boundary, save that step together and stop;
    no hang, no rank left waiting in a collective."""
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "cfg.yaml", corpus, out, steps=40, save_every=100)
    worker = tmp_path / "stop_worker.py"
    worker.write_text(STOP_WORKER)
    cmd = torchrun(worker, cfg, tmp_path, TIMEOUT - 60)
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_lines(out / "metrics.jsonl", 2, proc)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-5000:]
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a == b and a["signal"] == signal.SIGTERM and 2 <= a["stopped"] < 40, (a, b)
    assert a["checkpoint"].endswith(f"step_{a['stopped']:08d}")
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{a['stopped']:08d}"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == a["stopped"]


EVAL_WORKER = r'''
import json, os, sys
import faulthandler
faulthandler.dump_traceback_later(int(sys.argv[3]), exit=True)  # a hang prints every stack and exits
from dualloop.eval.metrics import IoUMeter

scored = []  # (key, sum of the low-res logits) of every scored sample
add = IoUMeter.add_logits


def spy(self, logits, targets, groups, keys=None):
    scored.extend([list(k), float(lg.double().sum())] for k, lg in zip(keys, logits))
    return add(self, logits, targets, groups, keys)


IoUMeter.add_logits = spy
from dualloop.config import load_config
from dualloop.train.trainer import run_training

run_training(load_config(sys.argv[1]))
json.dump(scored, open(f"{sys.argv[2]}.rank{os.environ['RANK']}", "w"))
from dualloop.distributed import leave_together
leave_together()  # barrier + destroy: a rank exiting alone can abort at exit
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


def test_eval_during_training_on_two_zero3_ranks(corpus, tmp_path):
    """`eval.every` on 2 ZeRO-3 ranks: 3 samples per dataset (rank 1 has one fewer and runs a filler batch in
    lockstep) - no hang, eval.jsonl written, every sample scored once with the logits a one-process evaluation
    of the saved checkpoint gives, and the training losses those of the same run without evaluations."""
    from dualloop.config import load_config
    from dualloop.eval.evaluate import evaluate_model, open_eval_datasets
    from dualloop.eval.metrics import IoUMeter
    from dualloop.train.export import load_trained_model

    def config(name: str, every: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"preset": "tiny"},
            "data": {**corpus, "num_workers": 0},
            "loop": {"caption": {"max_new_tokens": 4}, "loss": {"backend": "torch", "caption": 1.0}},
            "train": {"output_dir": str(tmp_path / name), "micro_batch_size": 2, "steps": 3, "save_every": 2,
                      "lr": 1e-3, "warmup_ratio": 0.0, "ds_config": "zero3_bf16", "precision": "fp32",
                      "progress_bar": False, "tensorboard": True},
            "eval": {"every": every, "samples": 3, "batch_size": 2}}))
        return path

    def losses(name: str) -> list:
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    out, cfg, scored = tmp_path / "run", config("run", 2), tmp_path / "scored"
    log = _run_worker_on_two_ranks(tmp_path, EVAL_WORKER, cfg, scored)
    assert "eval at step 2" in log
    _run_worker_on_two_ranks(tmp_path, EVAL_WORKER, config("plain", 0), tmp_path / "plain_scored")
    assert losses("run") == losses("plain")  # step 3 follows an evaluation: same loss as without it
    lines = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2]
    n_datasets = len(corpus["eval_datasets"])
    assert lines[0]["cycle"]["samples"] == 3 * n_datasets  # merged on rank 0: both ranks' samples, none twice
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    ranks = [json.loads(scored.with_name(f"scored.rank{r}").read_text()) for r in (0, 1)]
    in_training = {tuple(k): v for part in ranks for k, v in part}
    assert len(in_training) == sum(len(p) for p in ranks)  # no sample scored on both ranks
    # the same evaluation of the step-2 checkpoint in this process, recorded the same way
    c = load_config(cfg)
    model = load_trained_model(out / "checkpoints" / "step_00000002", c)
    datasets = open_eval_datasets(c.data.eval_datasets)
    reference = []
    add = IoUMeter.add_logits

    def spy(self, logits, targets, groups, keys=None):
        reference.extend((tuple(k), float(lg.double().sum())) for k, lg in zip(keys, logits))
        return add(self, logits, targets, groups, keys)

    IoUMeter.add_logits = spy
    try:
        result = evaluate_model(model, datasets, samples=3, batch_size=2, max_new_tokens=4)
    finally:
        IoUMeter.add_logits = add
    assert set(in_training) == {k for k, _ in reference}
    for key, value in reference:
        assert in_training[key] == pytest.approx(value, rel=1e-3, abs=1e-2), key
    assert result["cycle"]["samples"] == lines[0]["cycle"]["samples"]
    assert result["grounding"]["samples"] == lines[0]["grounding"]["samples"]


def test_generated_answer_eval_during_training_on_two_zero3_ranks(corpus, tmp_path):
    """`eval.answer=generated` during training on 2 ZeRO-3 ranks (rank 1 runs a filler batch in lockstep; the
    ranks' replies hold different numbers of [SEG]s): no hang, and every sample's logits those of a one-process
    evaluation of the saved checkpoint with generated answers."""
    from dualloop.config import load_config
    from dualloop.eval.evaluate import evaluate_model, open_eval_datasets
    from dualloop.eval.metrics import IoUMeter
    from dualloop.train.export import load_trained_model

    out, cfg, scored = tmp_path / "run", tmp_path / "run.yaml", tmp_path / "scored"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"},
        "data": {**corpus, "num_workers": 0},
        "loop": {"caption": {"max_new_tokens": 4}, "loss": {"backend": "torch"}},
        "train": {"output_dir": str(out), "micro_batch_size": 2, "steps": 2, "save_every": 2, "lr": 1e-3,
                  "warmup_ratio": 0.0, "ds_config": "zero3_bf16", "precision": "fp32", "progress_bar": False,
                  "tensorboard": False},
        "eval": {"every": 2, "samples": 3, "batch_size": 2, "answer": "generated"}}))
    log = _run_worker_on_two_ranks(tmp_path, EVAL_WORKER, cfg, scored)
    assert "eval at step 2" in log
    (line,) = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert line["answer"] == "generated" and "no_seg" in line["cycle"] and "no_seg" in line["grounding"]
    in_training = {tuple(k): v for r in (0, 1) for k, v in json.loads(scored.with_name(f"scored.rank{r}").read_text())}
    c = load_config(cfg)
    model = load_trained_model(out / "checkpoints" / "step_00000002", c)
    reference, add = [], IoUMeter.add_logits

    def spy(self, logits, targets, groups, keys=None):
        reference.extend((tuple(k), float(lg.double().sum())) for k, lg in zip(keys, logits))
        return add(self, logits, targets, groups, keys)

    IoUMeter.add_logits = spy
    try:
        result = evaluate_model(model, open_eval_datasets(c.data.eval_datasets), samples=3, batch_size=2,
                                max_new_tokens=4, answer="generated")
    finally:
        IoUMeter.add_logits = add
    assert set(in_training) == {k for k, _ in reference}
    for key, value in reference:
        assert in_training[key] == pytest.approx(value, rel=1e-3, abs=1e-2), key
    for metric in ("cycle", "grounding"):
        assert result[metric]["no_seg"] == line[metric]["no_seg"]
