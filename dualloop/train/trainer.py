"""The training loop: `dualloop train --config CFG.yaml [key=value ...]`, `deepspeed --module dualloop.train ...`,
and `run_training(cfg)` from Python (the demo) all run `Trainer.fit`.

One optimizer step = `train.grad_accum` dual-loop micro-steps on every rank. A non-finite loss on any rank skips
the step on all ranks together: the flag is all-reduced, the gradients of that window are poisoned with NaN, and
DeepSpeed's non-finite-gradient path discards the update (grads cleared, scheduler not advanced, counted);
`train.max_consecutive_skips` skips in a row abort with a message.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import math
import os
import random
import sys
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from dualloop.config import Config, ConfigError, load_config, save_config
from dualloop.distributed import any_rank, exit_after_leaving, leave_together, max_over_ranks
from dualloop.train import checkpoint as ckpt_io
from dualloop.train import reshard
from dualloop.train.checkpoint_layout import is_own
from dualloop.train.ema import CaptionEMA
from dualloop.train.engine import (
    build_engine,
    device_type,
    engine_pass,
    fill_ds_config,
    init_distributed,
    load_ds_config,
    zero_stage,
)
from dualloop.train.export import adopt_exported_parts
from dualloop.train.generation import caption_phase, gather_and_hold, whole_model_step
from dualloop.train.metrics import LogWindow, MetricsWriter, StepMetrics
from dualloop.train.stop import StopOnSignal, TrainingStopped, ignore_stop_signals


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps."""


# torch's deprecation notice for the collectives DeepSpeed calls, once per call: noise in every training log
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _micro_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Sampling noise of a micro-step depends only on (seed, step, micro, rank): a resumed run draws the same."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def enable_activation_checkpointing(model, cfg: Config) -> None:
    """Non-reentrant activation checkpointing (required with frozen weights under ZeRO-3) on the LLM; on the mask
    decoder too when train.checkpoint_mask_decoder."""
    non_reentrant = {"use_reentrant": False}
    lm = getattr(model, "language_model", None)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    elif hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
    else:
        raise ConfigError("train.activation_checkpointing: the model exposes no LLM with activation checkpointing")
    if cfg.train.checkpoint_mask_decoder:
        decoder = getattr(getattr(model, "sam2", None), "mask_decoder", None)
        if decoder is None:
            raise ConfigError("train.checkpoint_mask_decoder: the model has no sam2.mask_decoder")
        _checkpoint_module(decoder)


def _checkpoint_module(module: torch.nn.Module) -> None:
    """Recompute `module`'s forward in backward (non-reentrant) when training with grad enabled."""
    import functools

    from torch.utils.checkpoint import checkpoint

    if any(True for _ in module.parameters(recurse=False)):
        # ZeRO-3 fetches a module's own weights in its pre-forward hook, which the recomputation would bypass
        raise ConfigError(f"cannot checkpoint {type(module).__name__}: it owns parameters directly")
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    module.forward = forward


class Trainer:
    """`evaluator`: called as evaluator(trainer, step) on every rank after every `eval.every` optimizer steps; returns
    an evaluation result (`dualloop.eval.evaluate.TrainingEvaluator`), logged to eval.jsonl and TensorBoard."""

    def __init__(self, cfg: Config, evaluator=None):
        self.cfg = cfg
        self.evaluator = evaluator
        t = cfg.train
        if cfg.eval.every < 0:
            raise ConfigError(f"eval.every must be >= 0 (0: no evaluation during training), got {cfg.eval.every}")
        if t.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
        if t.save_every < 1:
            raise ConfigError(f"train.save_every must be >= 1, got {t.save_every}")
        if t.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {t.log_every}")
        if t.max_consecutive_skips < 1:
            raise ConfigError(f"train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")
        if not cfg.data.datasets:
            raise ConfigError("data.datasets is empty: nothing to train on")
        if cfg.loop.caption.ema_decay is not None and cfg.loop.caption_grad == "reinforce":
            raise ConfigError("loop.caption.ema_decay cannot be used with caption_grad=reinforce: the policy "
                              "gradient needs captions sampled from the trained policy itself")
        from dualloop.loop.step import validate_loop_config

        validate_loop_config(cfg.loop)  # config errors surface before any distributed or model work
        self.device_name = device_type()
        ds_raw = load_ds_config(t.ds_config)
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        self.ds_config = fill_ds_config(ds_raw, t, world_size=env_world, device=self.device_name)
        self.zero3 = zero_stage(self.ds_config) == 3

        self.rank, self.world = init_distributed(self.device_name)
        if self.world != env_world:  # an already-initialized process group of another size
            self.ds_config = fill_ds_config(ds_raw, t, world_size=self.world, device=self.device_name)
        self.device = torch.device(self.device_name, int(os.environ.get("LOCAL_RANK", "0"))) \
            if self.device_name == "cuda" else torch.device("cpu")
        self.out_dir = Path(t.output_dir)
        ckpt_io.check_output_dir(self.out_dir)
        self._build_data()  # missing or bad data fails before the model is built
        resume = ckpt_io.resolve_resume_everywhere(t.resume, self.out_dir)
        # a checkpoint of another number of ranks or stage family: converted (once) before the engine, which must load
        # it universally
        stage = zero_stage(self.ds_config)
        self.resharded_from = reshard.prepare_resume(resume, self.world, stage, self._log, self.out_dir) if resume \
            else None
        if resume and cfg.model.preset != "pretrained" and reshard.stage_change(resume, stage):
            self._log(f"warning: model.preset={cfg.model.preset} draws its frozen weights at random, and ZeRO-3 draws "
                      "them otherwise than ZeRO-1/2 (in the 16-bit dtype, under zero.Init): after this change of stage "
                      "they are not the saved run's (the trained weights and the optimizer state are)")

        _seed_all(t.seed)  # identical initial weights on every rank
        from dualloop.model import build_model

        self.model = build_model(cfg.model, ds_config=self.ds_config if self.zero3 else None)
        if cfg.model.preset == "pretrained" and adopt_exported_parts(self.model, cfg.model.vlm_path):
            self._log(f"continuing from the export around {cfg.model.vlm_path}: trained new-token rows and "
                      "[SEG] projection adopted")
        from dualloop.loop.step import reinforce_dropout_note

        if note := reinforce_dropout_note(cfg.loop, cfg.model.lora):
            self._log(f"warning: {note}")
        if t.activation_checkpointing:
            enable_activation_checkpointing(self.model, cfg)
        self.ds_config = fill_ds_config(ds_raw, t, world_size=self.world, device=self.device_name,
                                        hidden_size=getattr(self.model, "hidden_size", None))
        if self.resharded_from is not None:
            self.ds_config = reshard.universal_load_config(self.ds_config)
        self.engine = build_engine(self.model, cfg, self.ds_config, self.device_name,
                                   optimizer_spec=ds_raw.get("optimizer"))
        if self.zero3:
            from deepspeed.utils import get_z3_leaf_modules

            leaves = sorted({type(m).__name__ for m in get_z3_leaf_modules(self.model)})
            self._log(f"ZeRO-3 fetches these blocks whole (train.zero3_leaf_modules): {', '.join(leaves) or 'none'}")
        _seed_all(t.seed + 1000 * self.rank + 1)  # per-rank streams (dropout) from here on

        from dualloop.loop.step import DualLoopStep

        self.ema = None
        if cfg.loop.caption.ema_decay is not None:
            self.ema = CaptionEMA(self.model.vision_language_modules(), cfg.loop.caption.ema_decay,
                                  names={id(p): n for n, p in self.model.named_parameters()})
        self.step_fn = DualLoopStep(self.model, cfg.loop, device=self.device, caption_context=self._caption_context,
                                    synced_gpus=self.zero3 and self.world > 1)
        self.start_step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.samples_seen = 0
        self.last_checkpoint: Path | None = None
        # the other run's checkpoint this run started from (its checkpoints record it: `checkpoint.continued`)
        self.started_from: str | None = None
        if resume is not None:
            own = is_own(resume, self.out_dir)
            state = ckpt_io.load(self.engine, resume, self.world, seed=t.seed, output_dir=self.out_dir)
            self.started_from = state.get("started_from") if own else str(resume.resolve())
            if own and self.rank == 0 and t.resume not in ("auto", "none") \
                    and str(Path(t.resume).resolve()) == self.started_from:
                self._log(f"train.resume={t.resume}: this run started from it and has saved {resume} since: going on "
                          "from there")
            self.start_step = int(state["step"])
            self.skipped_total = int(state.get("skipped_total", 0))
            self.consecutive_skips = int(state.get("consecutive_skips", 0))
            self.samples_seen = int(state.get("samples_seen", 0))
            self._restore_data_position(state, resume)
            if self.ema is not None:
                self._restore_ema(state, resume)
            self.last_checkpoint = resume
            written = f", written by {reshard.ranks(self.resharded_from)}" if self.resharded_from is not None else ""
            self._log(f"resumed from {resume} at step {self.start_step} (lr {self.engine.get_lr()[0]:.3g}{written})")
            if self.rank == 0 and own and (later := ckpt_io.later_complete(resume)):
                self._log(f"checkpoints of later steps remain from the earlier run ({', '.join(later)}); kept, not "
                          "counted by train.keep_last, and replaced as this run reaches their steps")
            settings = ckpt_io.config_changes(resume, cfg)
            if self._mixture_changed:  # said above, dataset by dataset, and not as two whole dataset lists
                settings = [s for s in settings if not s.startswith(("data.datasets ", "data.seed "))]
            if self.rank == 0 and settings:
                # the new values apply (lr, weight decay and the schedule included, see checkpoint.load)
                self._log(f"config changed since {resume}, the new settings apply from here on: {'; '.join(settings)}")
        self.writer = None
        if self.rank == 0:
            save_config(cfg, self.out_dir / "config.yaml")
            self.writer = MetricsWriter(self.out_dir, tensorboard=t.tensorboard,
                                        resume_step=self.start_step if resume is not None else None)

    @contextlib.contextmanager
    def _caption_context(self):
        """The caption phase: EMA weights swapped into the partitions (if configured), then gathered once or
        fetched per layer (caption.gather, read at every call)."""
        cc = self.cfg.loop.caption
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            # gathered EMA weights must not outlive the phase: grounding uses the live ones
            with caption_phase(self.engine, self.model.vision_language_modules(), cc.gather, self.device,
                               keep_gathered=cc.keep_gathered and self.ema is None) as info:
                yield info
        if self.ema is not None and self.zero3 and self.cfg.train.zero3_whole_step:
            # the EMA swap released the live weights, and no module hook fetches them back in this micro-step
            gather_and_hold([self.model])

    def _whole_step(self):
        """`train.zero3_whole_step`: the micro-step's forward and backward with the whole model gathered (once per
        optimizer step: held until it) and ZeRO-3's module hooks hidden; else nothing."""
        if not (self.zero3 and self.cfg.train.zero3_whole_step):
            return contextlib.nullcontext()
        return whole_model_step(self.engine, self.model)

    def _restore_data_position(self, state: dict, resume: Path) -> None:
        """The sampler at the checkpoint's data position. Saved by another number of ranks, it continues the epoch
        from the samples all of them had consumed (MixtureSampler.load_state_dict); from another mixture, a new
        epoch."""
        from dualloop.data.mixture import mixture_changes

        data = {"replicas": int(state.get("world_size", self.world)), **state["data"]}  # older: no "replicas"
        changed = mixture_changes(state.get("data_mixture"), self.mixture.fingerprint(self.cfg.data.seed))
        if changed:
            # the saved position counts into the old mixture's permutation: applied to another mixture it would
            # silently repeat some samples and skip others (or fail when the mixture shrank) - start a new epoch
            data = {"epoch": int(data["epoch"]) + 1, "position": 0}
            self._log(f"data changed since {resume} ({'; '.join(changed)}): its data position does not apply "
                      f"to the new mixture, which starts a new epoch (epoch {data['epoch']})")
        self.sampler.load_state_dict(data)
        self.consumed = self.sampler.position
        self._mixture_changed = bool(changed)
        if data.get("replicas", self.world) != self.world:
            self._log(self._data_position_note(data))

    def _data_position_note(self, saved: dict) -> str:
        """Where the data goes on after a resume on another number of ranks, in words."""
        s = self.sampler
        if s.epoch != int(saved["epoch"]):
            return (f"data position: the {reshard.ranks(saved['replicas'])} had finished epoch {saved['epoch']}; "
                    f"this run ({reshard.ranks(self.world)}) starts epoch {s.epoch}")
        return (f"data position: the {reshard.ranks(saved['replicas'])} had consumed the first {s.offset} of the "
                f"{s.length} samples of epoch {s.epoch}'s order; this run ({reshard.ranks(self.world)}) is dealt "
                f"the other {s.length - s.offset} ({s.num_samples} per rank), then the next epochs as usual")

    def _restore_ema(self, state: dict, resume: Path) -> None:
        """The caption EMA as saved: this rank's own, or (another number of ranks) cut from every saved rank's."""
        if "rank_states" in state:
            if not all("ema" in s for s in state["rank_states"]):
                raise ConfigError(f"{resume} holds no caption EMA state but loop.caption.ema_decay is set")
            self.ema.load_resharded([s["ema"] for s in state["rank_states"]], self.rank)
            return
        if "rank_state" not in state or "ema" not in state["rank_state"]:
            raise ConfigError(f"{resume} holds no caption EMA state but loop.caption.ema_decay is set")
        self.ema.load_state_dict(state["rank_state"]["ema"])

    # ------------------------------------------------------------------------------------------------ data
    def _build_data(self) -> None:
        from torch.utils.data import DataLoader

        from dualloop.data import MixtureSampler, build_mixture, collate_samples

        cfg = self.cfg
        try:
            self.mixture = build_mixture(cfg.data.datasets, seed=cfg.data.seed,
                                         max_bad_fraction=cfg.data.max_bad_fraction)
        except (ValueError, OSError) as e:
            raise ConfigError(f"data.datasets: {e}") from e
        self.sampler = MixtureSampler(len(self.mixture), num_replicas=self.world, rank=self.rank,
                                      seed=cfg.data.seed, shuffle=True)
        if self.sampler.num_samples < cfg.train.micro_batch_size:
            raise ConfigError(f"each rank gets {self.sampler.num_samples} samples per epoch, fewer than "
                              f"train.micro_batch_size={cfg.train.micro_batch_size}")
        workers = cfg.data.num_workers
        if cfg.data.timeout < 0:
            raise ConfigError(f"data.timeout must be >= 0 seconds (0: no limit), got {cfg.data.timeout}")
        self.loader = DataLoader(self.mixture, batch_size=cfg.train.micro_batch_size, sampler=self.sampler,
                                 collate_fn=collate_samples, num_workers=workers, drop_last=True,
                                 pin_memory=self.device.type == "cuda", persistent_workers=False,
                                 prefetch_factor=2 if workers > 0 else None, worker_init_fn=ignore_stop_signals,
                                 timeout=cfg.data.timeout if workers > 0 else 0,
                                 # its own generator: creating an iterator must not draw from the global RNG,
                                 # or a resumed run's dropout noise would be shifted by one draw
                                 generator=torch.Generator().manual_seed(cfg.data.seed))
        self.dataset_names = list(dict.fromkeys(spec["kind"] for spec in self.mixture.specs))
        self.consumed = 0  # samples of this rank consumed in the current epoch (the resumable data position)
        self._iter = None
        # before multiprocessing's own exit hook, which would SIGTERM the workers (ignored) and wait for them forever
        atexit.register(_close_data_at_exit, weakref.ref(self))

    def close_data(self) -> None:
        """Shut the DataLoader's workers down. They ignore stop signals (see dualloop/train/stop.py), so they are
        told to exit rather than terminated; done at the end of fit() and at interpreter exit. A later batch
        starts a new iterator at the consumed position (not after the batches the workers had prefetched)."""
        it, self._iter = self._iter, None
        if it is None:
            return
        shutdown = getattr(it, "_shutdown_workers", None)  # idempotent; what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()
        for worker in getattr(it, "_workers", []):
            # one stuck in a read (data.timeout) does not get the exit message and ignores the SIGTERM torch then
            # sends: multiprocessing's exit hook would wait for it forever
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)
        if self.consumed >= len(self.sampler):  # the epoch is done (as at StopIteration in _next_batch)
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.consumed = 0
        else:
            self.sampler.load_state_dict(self.sampler.state_dict(consumed=self.consumed))

    def _stuck_batch(self, error: Exception) -> str:
        """What the workers were reading when no batch came within data.timeout: the awaited batch's samples."""
        b = self.cfg.train.micro_batch_size
        where = []
        for index in self.sampler.indices()[self.consumed:self.consumed + b]:
            d, i = self.mixture.locate(int(index))
            try:
                info = self.mixture.datasets[d].sample_info(i)
            except Exception as e:  # noqa: BLE001 - the message must come out whatever the reader does
                info = f"(sample {i}: {e})"
            where.append(f"{self.mixture.names[d]}: {info}")
        return (f"rank {self.rank}: no batch from the data workers in {self.cfg.data.timeout:g} s (data.timeout): "
                f"a worker is stuck reading (a hung or very slow filesystem?). The batch it waits for: "
                f"{'; '.join(where)}. ({error})")

    def _next_batch(self) -> dict:
        """Every rank gets the same number of batches per epoch (equal-length shards, drop_last): epochs turn over
        on all ranks at the same micro-step."""
        while True:
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self.consumed = 0
                continue
            except RuntimeError as e:
                if "DataLoader timed out" not in str(e):
                    raise
                raise TrainingAborted(self._stuck_batch(e)) from e
            self.consumed += len(batch["source"])
            return batch

    # ------------------------------------------------------------------------------------------------ loop
    def _log(self, msg: str) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            # through tqdm: a line printed under a progress bar would be glued to it
            tqdm.write(f"[dualloop] {msg}", file=sys.stderr)
            sys.stderr.flush()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def train_step(self, step: int) -> dict:
        """One optimizer step (grad_accum micro-steps). Returns the reduced metrics record; `step_metrics` keeps
        its sums for the logging window."""
        t = self.cfg.train
        self.engine.train()
        metrics = StepMetrics(self.dataset_names, self.device)
        timings = {"data": 0.0, "caption": 0.0, "ground": 0.0, "backward": 0.0, "optimizer": 0.0}
        poisoned = False
        skipped_before = self.engine.skipped_steps
        # the lr this step's update uses (as HF Trainer logs it); after engine.step() it is the next step's
        lr = float(self.engine.get_lr()[0])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # peak_memory_mb is per step
        t_start = time.perf_counter()
        for micro in range(t.grad_accum):
            t0 = time.perf_counter()
            batch = self._next_batch()
            timings["data"] += time.perf_counter() - t0
            gen = torch.Generator().manual_seed(_micro_seed(t.seed, step, micro, self.rank))
            t_fwd = time.perf_counter()
            with self._whole_step():
                out = engine_pass(self.engine, lambda b=batch, g=gen: self.step_fn(b, g))
                loss = out.loss
                if step in t.debug_nan_steps and self.rank == 0 and micro == 0:
                    loss = loss * float("nan")  # fault injection (tests): rank 0 only, the others must follow
                bad = any_rank(not bool(torch.isfinite(loss.detach()).all()), self.device)  # all ranks skip together
                self._sync()
                t1 = time.perf_counter()
                if bad and not poisoned:
                    poisoned = True
                    # NaN gradients everywhere the loss reaches: DeepSpeed then discards the whole window's update
                    loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * float("nan")
                self.engine.backward(loss)
                self._sync()
            t2 = time.perf_counter()
            self.engine.step()
            self._sync()
            t3 = time.perf_counter()
            timings["caption"] += out.timings.get("caption", 0.0)
            # the forward's GPU work finishes at the sync before t1: count all of it after the caption phase as
            # grounding (+ losses), not only the time to queue it
            timings["ground"] += max(t1 - t_fwd - out.timings.get("caption", 0.0), 0.0)
            timings["backward"] += t2 - t1
            timings["optimizer"] += t3 - t2
            if not bad:
                metrics.add(out.sources, out.values, out.valid)
        skipped = self.engine.skipped_steps > skipped_before
        if poisoned and not skipped:
            raise RuntimeError("a non-finite loss was seen but DeepSpeed applied the update; refusing to continue")
        if self.ema is not None and not skipped:
            self.ema.update()
        record = metrics.reduce()
        self.step_metrics = metrics
        elapsed = time.perf_counter() - t_start
        global_batch = t.micro_batch_size * t.grad_accum * self.world
        self.samples_seen += global_batch
        grad_norm = self.engine.get_global_grad_norm()
        record.update({
            "step": step + 1, "lr": lr, "skipped": bool(skipped),
            "skipped_total": self.skipped_total + int(skipped), "samples_seen": self.samples_seen,
            "samples_per_s": global_batch / max(elapsed, 1e-9), "step_time_s": elapsed,
            "grad_norm": float(grad_norm) if grad_norm is not None and math.isfinite(float(grad_norm)) else None,
            "peak_memory_mb": self._peak_memory_mb(),
            **{f"time_{k}_s": v for k, v in timings.items()},
        })
        if skipped:
            record["skip_reason"] = "non-finite loss" if poisoned else "non-finite gradient"
        return record

    def _after_step(self, step: int, record: dict, bar, flush: bool = False) -> None:
        """Skip accounting, metrics, progress bar; TrainingAborted after too many skips in a row. A metrics line
        every train.log_every steps, at a skipped step, and where `flush` (a checkpoint follows): it averages the
        steps since the previous line, so every step is in one line and a resumed run writes the same lines."""
        t = self.cfg.train
        if record["skipped"]:
            self.skipped_total += 1
            self.consecutive_skips += 1
            self._log(f"step {step + 1}: {record['skip_reason']}, update skipped "
                      f"({self.consecutive_skips} in a row, {self.skipped_total} in total)")
        else:
            self.consecutive_skips = 0
        if self.writer is not None:
            self._log_window.add(self.step_metrics, record)
            if flush or (step + 1) % t.log_every == 0 or record["skipped"]:
                self.writer.write(self._log_window.take())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                            cycle_iou=f"{record.get('cycle_iou', float('nan')):.3f}",
                            sps=f"{record['samples_per_s']:.1f}")
        if self.consecutive_skips >= t.max_consecutive_skips:
            raise TrainingAborted(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient (last: step "
                f"{step + 1}); aborting. Lower train.lr, check the data, or use train.precision=fp32.")

    def _evaluate(self, step: int) -> None:
        """Collective: the evaluator on every rank. Its RNG use (if any) is kept out of the training streams, so
        a run draws the same with and without evaluations."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            result = self.evaluator(self, step)
        if self.writer is not None:
            self.writer.write_eval(step, result)
        c, g = result["cycle"], result["grounding"]
        self._log(f"eval at step {step} ({result['seconds']:.1f} s): cycle gIoU {c['giou']:.3f} cIoU {c['ciou']:.3f} "
                  f"({c['samples']} samples), grounding gIoU {g['giou']:.3f} cIoU {g['ciou']:.3f} "
                  f"({g['samples']} samples)")

    def _save(self, step: int) -> None:
        """Collective: a checkpoint after `step` optimizer steps."""
        rank_state = {"ema": self.ema.state_dict()} if self.ema is not None else None
        self.last_checkpoint = ckpt_io.save(self.engine, self.out_dir, step, self._trainer_state(step), self.cfg,
                                            self.cfg.train.keep_last, rank_state=rank_state, log=self._log)

    def _trainer_state(self, step: int) -> dict:
        return {"step": step, "world_size": self.world, "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive_skips, "samples_seen": self.samples_seen,
                "data": self.sampler.state_dict(consumed=self.consumed),
                "data_mixture": self.mixture.fingerprint(self.cfg.data.seed), "started_from": self.started_from}

    def fit(self) -> dict:
        t = self.cfg.train
        # the summary needs the first and last trained steps only: a list of every record grew ~5 KB a step per rank
        steps_run, first_done, last_done = 0, None, None
        if self.start_step >= t.steps:
            self._log(f"nothing to train: resumed at step {self.start_step}, train.steps is {t.steps} (raise "
                      "train.steps to train on)")
        bar = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.start_step, desc="dual loop", dynamic_ncols=True)
        t_fit = time.perf_counter()
        stopped = None
        self._log_window = LogWindow(self.samples_seen)
        try:
            with StopOnSignal() if t.stop_on_signal else contextlib.nullcontext() as stop:
                for step in range(self.start_step, t.steps):
                    record = self.train_step(step)
                    steps_run += 1
                    if not record["skipped"]:
                        first_done, last_done = first_done or record, record
                    # a signal on any rank stops every rank at this same step (one tiny all-reduce per step)
                    signum = max_over_ranks(stop.signum or 0, self.device) if stop is not None else 0
                    save = (step + 1) % t.save_every == 0 or step + 1 == t.steps or bool(signum)
                    self._after_step(step, record, bar, flush=save)
                    if save:
                        self._save(step + 1)
                    # after the save (an evaluation that fails loses no step); not when stopping: a scheduler's
                    # grace period is for the checkpoint
                    every = self.cfg.eval.every
                    if self.evaluator is not None and every and (step + 1) % every == 0 and not signum:
                        self._evaluate(step + 1)
                    if signum and step + 1 < t.steps:
                        stopped = TrainingStopped(signum, step + 1, self.last_checkpoint, t.resume == "auto")
                        self._log(str(stopped))
                        break
        finally:
            self.close_data()
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
        if stopped is not None:
            raise stopped
        seconds = time.perf_counter() - t_fit
        summary = {
            "steps": t.steps, "steps_run": steps_run, "start_step": self.start_step,
            "mode": self.cfg.loop.caption_grad, "device": str(self.device), "world_size": self.world,
            "seconds": seconds,
            "samples_per_s": steps_run * t.micro_batch_size * t.grad_accum * self.world / max(seconds, 1e-9),
            "loss_first": (first_done or {}).get("loss"), "loss_last": (last_done or {}).get("loss"),
            "cycle_iou_first": (first_done or {}).get("cycle_iou"),
            "cycle_iou_last": (last_done or {}).get("cycle_iou"),
            "skipped_steps": self.skipped_total, "output_dir": str(self.out_dir),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "metrics_path": str(self.out_dir / "metrics.jsonl"),
        }
        return summary


def _close_data_at_exit(trainer_ref) -> None:
    trainer = trainer_ref()
    if trainer is not None:
        trainer.close_data()


def run_training(cfg: Config) -> dict:
    """Train with `cfg` in this process (or as one rank of a launcher's job); returns the summary dict.
    With `eval.every`, evaluates during training (the command's wiring: eval sits beside train, which does not
    otherwise import it)."""
    evaluator = None
    if cfg.eval.every > 0:
        from dualloop.eval.evaluate import TrainingEvaluator

        evaluator = TrainingEvaluator(cfg)  # opens the evaluation datasets: their errors come before the model's
    return Trainer(cfg, evaluator=evaluator).fit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dualloop train", description="Train the dual loop (DeepSpeed).")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run_training(cfg)
    # The error exits skip the interpreter's teardown too (see the end): a rank aborted there ("terminate called
    # without an active exception", exit -6) would hide the exit code a scheduler acts on. Their ranks are not
    # together here (an error on one rank only), so no barrier; fit closed the data, metrics and TensorBoard.
    except ConfigError as e:
        print(f"dualloop train: config error: {e}", file=sys.stderr)
        return exit_after_leaving(2)
    except (TrainingAborted, ckpt_io.NoRoomForCheckpoint) as e:
        print(f"dualloop train: aborted: {e}", file=sys.stderr)
        return exit_after_leaving(3)
    except TrainingStopped as e:
        print(f"dualloop train: {e}", file=sys.stderr)
        # every rank stops at the same step (a signal on one is shared) with its checkpoint written: they leave
        # together and end as below, so that the exit code a scheduler requeues on is this one on every rank
        leave_together()
        return exit_after_leaving(e.exit_code)
    leave_together()
    if int(os.environ.get("RANK", "0")) == 0:
        import json

        print(json.dumps(summary, indent=1))
    # as `dualloop eval` ends: everything is written (fit closed the data workers, metrics.jsonl and TensorBoard; the
    # atexit hooks left - leaving the group, closing the data - have nothing left to do), and a rank can abort in the
    # interpreter's teardown after the group is gone
    return exit_after_leaving(0, int(summary["world_size"]))
