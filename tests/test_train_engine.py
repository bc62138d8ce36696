"""Trainer pieces that need no process group: ds_config "auto" filling and its consistency checks, the schedule,
the shipped configs, checkpoint pointer semantics, metrics, and `dualloop train` config errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dualloop.config import ConfigError, TrainConfig, load_config
from dualloop.train import checkpoint as ckpt_io
from dualloop.train.engine import DS_CONFIG_DIR, fill_ds_config, load_ds_config, warmup_cosine

REPO = Path(__file__).resolve().parents[1]


def _train(**kw) -> TrainConfig:
    t = TrainConfig(micro_batch_size=2, grad_accum=4, lr=4e-5, weight_decay=0.05, grad_clip=1.0)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_auto_fields_filled_from_the_training_config():
    ds = fill_ds_config(load_ds_config("zero3_bf16"), _train(), world_size=8, device="cuda", hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True  # precision auto on GPU
    assert ds["optimizer"]["params"] == {"lr": 4e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.05}
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 64 * 64 and z["stage3_param_persistence_threshold"] == 640
    assert z["stage3_max_reuse_distance"] == 12 * 64 * 64  # not DeepSpeed's 1e9 (a quadratic trace scan per step)
    # CPU: fp32, no DeepSpeed optimizer (client torch AdamW), no offload; bucket sizes left to DeepSpeed
    ds = fill_ds_config(load_ds_config("zero3_offload_bf16"), _train(), world_size=1, device="cpu")
    assert ds["bf16"]["enabled"] is False and "optimizer" not in ds and ds["zero_allow_untested_optimizer"]
    assert "offload_optimizer" not in ds["zero_optimization"] and "reduce_bucket_size" not in ds["zero_optimization"]
    ds = fill_ds_config(load_ds_config("zero3_offload_bf16"), _train(), world_size=8, device="cuda")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    ds = fill_ds_config(load_ds_config("zero2_bf16"), _train(precision="fp32"), world_size=2, device="cuda")
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False and ds["train_batch_size"] == 16


def test_explicit_fields_must_agree():
    base = load_ds_config("zero3_bf16")
    agreeing = dict(base, train_micro_batch_size_per_gpu=2, train_batch_size=64, gradient_clipping=1)
    assert fill_ds_config(agreeing, _train(), world_size=8, device="cuda")["train_batch_size"] == 64
    cases = [({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
             ({"train_batch_size": 32}, "train_batch_size"),
             ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps"),
             ({"gradient_clipping": 0.5}, "gradient_clipping"),
             ({"bf16": {"enabled": False}}, "bf16.enabled"),
             ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "optimizer.params.lr"),
             ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
             ({"fp16": {"enabled": True}}, "fp16"),
             ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "sub_group_size")]
    for change, match in cases:
        with pytest.raises(ConfigError, match=match):
            fill_ds_config(dict(base, **change), _train(), world_size=8, device="cuda")
    with pytest.raises(ConfigError, match="precision"):
        fill_ds_config(base, _train(precision="fp16"), world_size=1, device="cuda")


def test_ds_config_lookup_errors(tmp_path):
    with pytest.raises(ConfigError, match="zero3_bf16"):  # the message lists the known names
        load_ds_config("zero4")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(bad))
    assert sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")) == ["zero2_bf16", "zero3_bf16", "zero3_offload_bf16"]


def test_warmup_cosine_schedule():
    f = [warmup_cosine(s, total=100, warmup=5, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0) and f[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))  # monotone decay after warmup
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_shipped_configs_are_valid():
    full = load_config(REPO / "configs" / "full_8gpu.yaml")
    kinds = [(d["kind"], d["repeats"]) for d in full.data.datasets]
    assert kinds == [("sav", 2), ("sa1b", 1), ("openimages", 1), ("refcoco", 4)]
    ds = fill_ds_config(load_ds_config(full.train.ds_config), full.train, world_size=8, device="cuda")
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert full.train.activation_checkpointing
    small = load_config(REPO / "configs" / "test_1gpu.yaml")
    ds = fill_ds_config(load_ds_config(small.train.ds_config), small.train, world_size=1, device="cuda")
    assert ds["zero_optimization"]["stage"] == 3


def test_latest_pointer_only_for_complete_checkpoints(tmp_path):
    root = ckpt_io.checkpoint_root(tmp_path)
    assert ckpt_io.latest_checkpoint(tmp_path) is None
    assert ckpt_io.resolve_resume("auto", tmp_path) is None and ckpt_io.resolve_resume("none", tmp_path) is None
    done = root / ckpt_io.tag_for(2)
    done.mkdir(parents=True)
    (done / ckpt_io.COMPLETE).write_text("2")
    ckpt_io.write_atomic(root / ckpt_io.LATEST, done.name)
    (root / ckpt_io.tag_for(4)).mkdir()  # a save that died half-way: no COMPLETE, pointer untouched
    assert ckpt_io.latest_checkpoint(tmp_path) == done
    assert ckpt_io.resolve_resume(str(done), tmp_path / "elsewhere") == done
    assert ckpt_io.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == done
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt_io.resolve_resume(str(root / ckpt_io.tag_for(4)), tmp_path)
    (root / ckpt_io.LATEST).write_text(ckpt_io.tag_for(4))
    with pytest.raises(ConfigError, match="incomplete"):
        ckpt_io.latest_checkpoint(tmp_path)
    assert not list(root.glob("latest.tmp*"))


def test_checkpoint_files_reach_disk_before_the_checkpoint_is_declared_complete(tmp_path, monkeypatch):
    import os

    class FakeEngine:
        def save_checkpoint(self, root, tag, save_latest):
            os.makedirs(os.path.join(root, tag), exist_ok=True)
            with open(os.path.join(root, tag, "zero_pp_rank_0_mp_rank_00_model_states.pt"), "wb") as f:
                f.write(b"weights")

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    cfg = load_config(REPO / "configs" / "test_1gpu.yaml")
    ckpt = ckpt_io.save(FakeEngine(), tmp_path, 3, {"step": 3}, cfg)
    assert ckpt_io.latest_checkpoint(tmp_path) == ckpt
    files = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "rng_state_rank0.pt", "trainer_state.json", "config.yaml"]
    first_marker = min(i for i, name in enumerate(synced) if name.startswith(ckpt_io.COMPLETE))
    for name in files:  # every file flushed before COMPLETE (and so before the pointer) is written
        assert name in synced[:first_marker], (name, synced)
    assert any(name.startswith(ckpt_io.LATEST) for name in synced[first_marker:])


def test_step_metrics_and_writer(tmp_path):
    import torch

    from dualloop.train.metrics import MetricsWriter, StepMetrics

    m = StepMetrics(["sav", "refcoco"], torch.device("cpu"))
    m.add(["sav", "refcoco"], {"loss": torch.tensor([1.0, 3.0]), "caption_loss": torch.tensor([9.0, 2.0])},
          {"caption_loss": torch.tensor([False, True])})
    m.add(["mystery"], {"loss": torch.tensor([5.0])}, {})
    r = m.reduce()
    assert r["loss"] == pytest.approx(3.0) and r["caption_loss"] == pytest.approx(2.0)
    assert r["per_dataset"]["sav"] == {"loss": 1.0, "samples": 1}
    assert r["per_dataset"]["refcoco"] == {"loss": 3.0, "caption_loss": 2.0, "samples": 1}
    assert r["per_dataset"]["other"]["loss"] == 5.0

    w = MetricsWriter(tmp_path, tensorboard=True, resume_step=None)
    for s in (1, 2, 3):
        w.write({"step": s, "loss": float(s), "per_dataset": {"sav": {"loss": 1.0}}})
    w.close()
    assert list((tmp_path / "tensorboard").glob("events.*"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a kill
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=2)  # a resume drops the steps it will redo
    w.write({"step": 3, "loss": 30.0})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_eval_results_go_to_eval_jsonl_and_a_resume_keeps_those_before_it(tmp_path):
    from dualloop.train.metrics import MetricsWriter

    def result(giou):
        nan = float("nan")  # no captioned dataset: grounding has no samples
        return {"seconds": 1.0, "cycle": {"samples": 2, "ciou": giou, "giou": giou,
                                          "per_dataset": {"sav_val": {"samples": 2, "ciou": giou, "giou": giou}}},
                "grounding": {"samples": 0, "ciou": nan, "giou": nan, "per_dataset": {}}}

    w = MetricsWriter(tmp_path, tensorboard=True, resume_step=None)
    w.write({"step": 1, "loss": 1.0})
    for step in (2, 4):
        w.write_eval(step, result(step / 10))
    w.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"eval/cycle_giou", "eval_sav_val/cycle_ciou"} <= set(events.Tags()["scalars"])
    assert "eval/grounding_giou" not in events.Tags()["scalars"]  # nothing to plot without samples
    assert [e.value for e in events.Scalars("eval/cycle_giou")] == pytest.approx([0.2, 0.4])
    # step records stay alone in metrics.jsonl; NaN (not JSON) is written as null
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    evals = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and evals[0]["grounding"]["giou"] is None
    assert evals[0]["answer"] == "given"  # eval.answer (a result without it: the default)
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=3)  # resumed from step 3: step 4 is redone
    w.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [2]
    MetricsWriter(tmp_path, tensorboard=False, resume_step=None).close()  # a fresh run starts fresh logs
    assert not (tmp_path / "eval.jsonl").exists()


def test_caption_phase_without_zero3_is_a_no_op():
    import torch

    from dualloop.train.generation import caption_phase, decide_gather

    with caption_phase(None, [torch.nn.Linear(2, 2)], "auto") as info:
        assert info == {"gathered": False, "bytes": 0, "lora_merged": 0, "whole": True}
    with pytest.raises(ValueError, match="gather"):
        with caption_phase(None, [], "sometimes"):
            pass
    assert decide_gather("per_layer", [], torch.device("cpu")) is False
    assert decide_gather("auto", [torch.nn.Parameter(torch.zeros(4))], torch.device("cpu")) is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_caption_phase_folds_lora_into_temporary_weights(dtype):
    """Inside the phase the adapters are merged (no LoRA matmuls run, same outputs); after it the original weight
    tensors are back, bit for bit, and the LoRA path runs again."""
    from peft import LoraConfig, get_peft_model

    from dualloop.train.generation import caption_phase, lora_merge_bytes

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"])).to(dtype)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: make the adapters matter
    x = torch.randn(5, 16, dtype=dtype)
    lora_calls = []
    for name, m in model.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(lambda *_: lora_calls.append(1))
    originals = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if "base_layer.weight" in n}
    with torch.no_grad():
        ref = model(x)
        lora_calls.clear()
        assert lora_merge_bytes([model]) == sum(p.numel() * p.element_size() for p, _ in originals.values())
        with caption_phase(None, [model], "auto") as info:
            merged = model(x)
            assert info["lora_merged"] == 2 and not lora_calls
        after = model(x)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(merged.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.equal(after, ref) and len(lora_calls) == 2
    for n, p in model.named_parameters():
        if n in originals:
            assert p is originals[n][0] and torch.equal(p, originals[n][1])


def test_train_cli_config_errors(tmp_path, capsys, monkeypatch):
    from dualloop.train.trainer import main

    monkeypatch.setenv("LOCAL_RANK", "0")  # main() sets it from --local_rank; keep it out of other tests

    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {stpes: 3}\n")
    assert main(["--config", str(cfg)]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    cfg.write_text("data: {datasets: [{kind: sav, root: /x}]}\n")
    for override, match in [("train.ds_config=zero9", "zero9"), ("loop.caption_grad=straight", "caption_grad"),
                            ("train.steps=0", "train.steps"), ("loop.loss.preset=sam3", "preset")]:
        assert main(["--config", str(cfg), "--local_rank=0", override]) == 2
        assert match in capsys.readouterr().err
    cfg.write_text("train: {steps: 2}\n")
    assert main(["--config", str(cfg)]) == 2
    assert "data.datasets is empty" in capsys.readouterr().err


def test_caption_ema_average_swap_and_state():
    import torch

    from dualloop.train.ema import CaptionEMA

    lin = torch.nn.Linear(3, 2)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    ema = CaptionEMA([lin, frozen, lin], decay=0.75)
    assert len(ema.params) == 2  # trainable, deduplicated
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(4.0)
    ema.update()
    torch.testing.assert_close(ema.shadow[0], start + 1.0)  # 0.75 * w0 + 0.25 * (w0 + 4)
    live = lin.weight.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(lin.weight.detach(), start + 1.0)
    torch.testing.assert_close(lin.weight.detach(), live)
    other = CaptionEMA([lin], decay=0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="does not match"):
        CaptionEMA([frozen.requires_grad_(True)], decay=0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        CaptionEMA([lin], decay=1.0)


def test_mask_decoder_checkpointing_recomputes_in_backward():
    import torch

    from dualloop.train.trainer import _checkpoint_module

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return torch.tanh(self.inner(x))

    block = Block()
    x = torch.randn(3, 4)
    expected = torch.autograd.grad(block(x).sum(), block.inner.weight)[0]
    block.calls = 0
    _checkpoint_module(block)
    grad = torch.autograd.grad(block(x).sum(), block.inner.weight)[0]
    assert block.calls == 2 and torch.allclose(grad, expected)  # forward once, recomputed once in backward
    with torch.no_grad():
        block(x)
    assert block.calls == 3  # no checkpointing without grad
    with pytest.raises(ConfigError, match="owns parameters"):
        _checkpoint_module(torch.nn.Linear(2, 2))


def test_zero3_leaf_module_choice():
    from torch import nn

    from dualloop.train.zero3_host import zero3_leaf_classes

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(2, 2)) for _ in range(2))

        def zero3_leaf_classes(self):
            return [nn.Sequential]

    m = Model()
    assert zero3_leaf_classes(m, ["auto"]) == [nn.Sequential]
    assert zero3_leaf_classes(m, []) == []
    assert zero3_leaf_classes(m, ["Linear"]) == ["Linear"]
    for bad in (["Nope"], ["auto", "Linear"]):
        with pytest.raises(ConfigError, match="zero3_leaf_modules"):
            zero3_leaf_classes(m, bad)


def test_deepspeed_nvtx_ranges_switch(monkeypatch):
    """train.deepspeed_nvtx: DeepSpeed's instrumented functions skip the NVTX push/pop (and their is_compiling
    checks) when off, and do them when on."""
    import deepspeed.utils.nvtx as nvtx

    from dualloop.train.zero3_host import set_deepspeed_nvtx

    checks = []
    monkeypatch.setattr(nvtx, "is_compiling", lambda: checks.append(1) or False)
    monkeypatch.setattr(nvtx, "enable_nvtx", nvtx.enable_nvtx)  # restored after the test
    wrapped = nvtx.instrument_w_nvtx(lambda x: x + 1)
    set_deepspeed_nvtx(False)
    assert wrapped(1) == 2 and checks == []
    set_deepspeed_nvtx(True)
    assert wrapped(1) == 2 and len(checks) == 2
    assert TrainConfig().deepspeed_nvtx is False


def test_stop_on_signal_records_the_first_signal_and_restores_handlers():
    import os
    import signal

    from dualloop.train.stop import StopOnSignal, TrainingStopped

    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not replace the first
        assert stop.signum == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C after a stop request: at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
    e = TrainingStopped(signal.SIGTERM, 7, "/x/step_00000007")
    assert e.exit_code == 143 and "SIGTERM after step 7" in str(e) and "rerun the same command to resume" in str(e)
    # without train.resume=auto (the demo: none) the same command would start over: the message names the override
    e = TrainingStopped(signal.SIGTERM, 7, "/x/step_00000007", resume_auto=False)
    assert "with train.resume=/x/step_00000007 to resume" in str(e)


def test_close_data_stops_workers_and_resumes_at_the_consumed_position():
    """Trainer.close_data (end of fit, interpreter exit): the workers, which ignore stop signals, exit; the next
    batch continues where consumption stopped, not after what the workers had prefetched."""
    import types

    from torch.utils.data import DataLoader

    from dualloop.data import MixtureSampler
    from dualloop.train.stop import ignore_stop_signals
    from dualloop.train.trainer import Trainer

    data = [{"source": f"s{i}"} for i in range(40)]
    sampler = MixtureSampler(len(data), seed=0, shuffle=True)
    loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=1, prefetch_factor=4,
                        collate_fn=lambda items: {"source": [x["source"] for x in items]},
                        worker_init_fn=ignore_stop_signals)
    tr = types.SimpleNamespace(loader=loader, sampler=sampler, consumed=0, _iter=None)
    next_batch = lambda: Trainer._next_batch(tr)  # noqa: E731
    first = [next_batch()["source"] for _ in range(2)]
    workers = list(tr._iter._workers)
    assert sampler.position > tr.consumed == 8  # the worker prefetched ahead
    Trainer.close_data(tr)
    assert tr._iter is None and not any(w.is_alive() for w in workers)
    rest = [next_batch()["source"] for _ in range(8)]
    order = [f"s{i}" for i in sampler.indices(0)]
    assert sum(first + rest, []) == order  # nothing skipped, nothing repeated
    Trainer.close_data(tr)  # right at the end of the epoch: the next batch is the next epoch's first
    Trainer.close_data(tr)  # idempotent
    assert next_batch()["source"] == [f"s{i}" for i in sampler.indices(1)[:4]] and sampler.epoch == 1
    Trainer.close_data(tr)


def test_build_engine_normalizes_the_cuda_arch_list(monkeypatch):
    """DeepSpeed's JIT op builder (FusedAdam) fails on TORCH_CUDA_ARCH_LIST entries like 9.0a; the launch scripts
    rewrite them, but `dualloop train` and the nodes pdsh starts (it does not forward the variable) do not."""
    import deepspeed

    from dualloop.train import engine as engine_mod

    seen = {}

    def fake_initialize(**kw):
        seen["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        return "engine", None, None, None

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0a+PTX")
    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    monkeypatch.setattr(engine_mod, "fused_adam_available", lambda: True)
    cfg = load_config(None, [])
    ds = fill_ds_config(load_ds_config("zero2_bf16"), cfg.train, world_size=1, device="cuda")
    assert engine_mod.build_engine(torch.nn.Linear(4, 4), cfg, ds, "cuda") == "engine"
    assert seen["arch"] == "8.0;9.0+PTX"


def test_srun_and_mpirun_ranks_reach_torch():
    """srun and OpenMPI's mpirun (deepspeed --launcher openmpi) set only their own variables: without RANK and
    WORLD_SIZE every process would train alone as a world of one, all writing the same output_dir."""
    from dualloop.train.engine import env_from_scheduler

    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5", "MASTER_ADDR": "node1"}
    env_from_scheduler(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("5", "16", "5", "29500")
    env = {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "6000"}
    env_from_scheduler(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("9", "16", "1", "6000")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        env_from_scheduler({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"})
    # a launcher's own variables win; a batch script (no job step) or a one-task step stays a plain run
    for env in ({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"},
                {"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}):
        before = dict(env)
        env_from_scheduler(env)
        assert env == before
