"""`dualloop eval`: cycle IoU (caption → segment, against mask2) and referring segmentation from ground-truth captions
(cIoU / gIoU, RefCOCO conventions), overall and per dataset.

The evaluation subset is deterministic: `samples` indices evenly spaced over each dataset (0 or None: all of it).
`eval.answer`: how the grounding prompt is answered: `given` (the answer "It is [SEG]." teacher-forced, as in
training) or `generated` (the model's own greedy reply, segmenting from its [SEG]s as Sa2VA's RefCOCO evaluation
does: a reply without [SEG] is an empty prediction, counted as `no_seg`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dualloop.distributed import exit_after_leaving, leave_process_group, leave_together
from dualloop.eval.metrics import IoUMeter, prediction_logits

ANSWERS = ("given", "generated")  # eval.answer


def check_answer(answer: str, where: str = "eval.answer") -> str:
    if answer not in ANSWERS:
        raise ValueError(f"{where} must be one of {', '.join(ANSWERS)}, got {answer!r}")
    return answer


def eval_indices(length: int, samples: int | None) -> list[int]:
    if not samples or samples >= length:  # 0 / None: the whole split (published RefCOCO figures)
        return list(range(length))
    return sorted(set(np.round(np.linspace(0, length - 1, samples)).astype(int).tolist()))


@torch.no_grad()
def evaluate_model(model, datasets: dict, *, samples: int | None = 64, batch_size: int = 4,
                   max_new_tokens: int = 16, keep_examples: int = 0, cuda_graph: bool = False, rank: int = 0,
                   world_size: int = 1, lockstep: bool = False, caption_context=None, answer: str = "given") -> dict:
    """Evaluate `model` (a DualLoopModel, or anything with caption()/ground()) on named map-style datasets.

    Returns {"cycle": {...}, "grounding": {...}, "examples": [...], "seconds": s}; "grounding" scores every
    ground-truth caption of a sample as one sample (RefCOCO: each sentence of a ref, as LISA and Sa2VA count).
    A model with `model_cfg.object_gate` predicts an empty mask where SAM2's object score is <= 0 (SAM2's
    video-predictor rule).
    cuda_graph: caption with CUDA-graph decoding (`DualLoopModel.caption`); only for a model whose weights stay in
    place (not one ZeRO-3 fetches per layer).
    rank, world_size: with a process group of world_size ranks, each scores every world_size-th sample with its
    own whole model (no collective until the end, so ranks may take different times) and every rank returns the
    scores of all samples, merged in the single-process order; examples come from this rank's samples.
    lockstep: the ranks share a partitioned model (ZeRO-3 during training), whose every module call is a
    collective: each rank runs the same number of batches (a rank short of samples re-runs one of its own, or the
    dataset's first, unscored) and decodes with `synced_gpus`.
    caption_context: a zero-argument callable returning the context of each caption phase (the trainer's ZeRO-3
    gather-once); it may yield a dict whose "whole" says whether the weights stay in place (for `cuda_graph`).
    answer: "given" (the grounding prompt's answer "It is [SEG]." is given) or "generated": the model generates
    its reply to every grounding prompt, the cycle's and the ground-truth captions' (`ground_reply`, in the caption
    phase, with the caption's `synced_gpus` / `cuda_graph`), and segments from its [SEG]s; a reply without one is
    an empty prediction. The result then says, per metric and dataset, how many scored replies had no [SEG]
    ("no_seg")."""
    from dualloop.data import DataError, collate_samples  # train → data direction: eval sits beside train

    check_answer(answer)
    generated = answer == "generated"
    if generated and not hasattr(model, "segment_replies"):
        raise ValueError("eval.answer=generated needs a model that generates its grounding replies (ground_reply, "
                         "segment_replies)")
    no_seg = {"cycle": {}, "grounding": {}}  # scored replies without [SEG], per metric and dataset
    was_training = model.training
    model.eval()
    cycle, grounding = IoUMeter(), IoUMeter()
    examples = []
    per_dataset_examples = -(-keep_examples // max(len(datasets), 1))  # spread the examples over the datasets
    start = time.perf_counter()
    error = None
    try:
        for d, (name, ds) in enumerate(datasets.items()):
            idx = eval_indices(len(ds), samples)
            mine, scored = rank_share(len(idx), rank, world_size, lockstep)
            kept = 0
            for b in range(0, len(mine), batch_size):
                pos = mine[b:b + batch_size]
                n_scored = max(0, min(len(pos), scored - b))
                batch = collate_samples([ds[idx[k]] for k in pos])
                # one grounding call for the cycle (image2 + generated caption) and the ground-truth captions
                # (image1 + each of its captions): an image that is both (single-image datasets) goes through the
                # encoders once
                with_gt = [(j, n, c) for j, caps in enumerate(batch["captions"]) for n, c in enumerate(caps)]
                images = list(batch["image2"]) + [batch["image1"][j] for j, _, _ in with_gt]
                options = {"synced_gpus": True} if lockstep else {}
                with caption_context() if caption_context is not None else contextlib.nullcontext() as phase:
                    tokens1, tokens = _vision_tokens(model, list(batch["image1"]), images)
                    if cuda_graph and (phase is None or phase.get("whole")):  # a graph holds weights in place
                        options["cuda_graph"] = True
                    cap = model.caption(batch["image1"], batch["mask1"], max_new_tokens=max_new_tokens, **options,
                                        **tokens1)
                    ids, lengths = cap.ids, cap.lengths
                    queries = [False] * len(cap.lengths) + [True] * len(with_gt)  # the sentences are text queries
                    if with_gt:
                        gt_ids, gt_lengths = model.encode_queries([c for _, _, c in with_gt])
                        ids, lengths = stacked_captions([ids, gt_ids], [lengths, gt_lengths], model.pad_token_id)
                    if generated:  # as many decoding steps on every rank as the captions (synced_gpus)
                        reply = model.ground_reply(images, caption_ids=ids, caption_lengths=lengths, queries=queries,
                                                   **options, **tokens)
                if generated:  # from the [SEG] states its decoding computed: no second pass through the LLM
                    out = model.segment_replies(images, reply)
                else:
                    out = model.ground(images, caption_ids=ids, caption_lengths=lengths, queries=queries, **tokens)
                grounded = prediction_logits(model, out)
                # rows: the batch's cycle outputs, then its ground-truth captions'; lockstep filler samples (at the
                # end of the batch) are computed with the other ranks but not scored
                gt_rows = grounded[len(pos):]
                B = n_scored
                with_gt = [g for g in with_gt if g[0] < B]
                out_logits = grounded[:B]
                ious = cycle.add_logits(out_logits, batch["mask2"][:B], [name] * B, keys=[(d, k) for k in pos[:B]])
                if generated:
                    empty = (out.seg_count == 0).tolist()
                    _count(no_seg["cycle"], name, sum(empty[:B]))
                    _count(no_seg["grounding"], name, sum(empty[len(pos):len(pos) + len(with_gt)]))
                for j in range(len(ious)):
                    if kept < per_dataset_examples and len(examples) < keep_examples:
                        kept += 1
                        examples.append({
                            "dataset": name, "key": batch["key"][j], "caption": cap.texts[j], "iou": ious[j],
                            "image1": batch["image1"][j], "mask1": batch["mask1"][j], "image2": batch["image2"][j],
                            "mask2": batch["mask2"][j], "logits2": out_logits[j].float().cpu(),
                        })
                        if generated:
                            examples[-1]["reply"] = reply.texts[j]
                if with_gt:
                    grounding.add_logits(gt_rows[:len(with_gt)], [batch["mask1"][j] for j, _, _ in with_gt],
                                         [name] * len(with_gt), keys=[(d, pos[j], n) for j, n, _ in with_gt])
    except DataError as e:  # too many unreadable samples: every rank must still reach the gather below
        if world_size == 1 or lockstep:  # lockstep: the others are in a module's collective; exit, the launcher
            raise  # takes them down
        error = f"rank {rank}: {e}"
    if world_size > 1:
        from dualloop.distributed import every_rank

        parts = every_rank((cycle, grounding, error))
        errors = [e for _, _, e in parts if e]
        if errors:
            raise DataError("; ".join(errors))
        cycle = IoUMeter.merged([c for c, _, _ in parts])
        grounding = IoUMeter.merged([g for _, g, _ in parts])
        if generated:  # every rank evaluates with the same answer: all make this second gather
            counts = every_rank(no_seg)
            no_seg = {m: {} for m in no_seg}
            for part in counts:
                for metric, per_dataset in part.items():
                    for name, n in per_dataset.items():
                        _count(no_seg[metric], name, n)
    if was_training:
        model.train()
    result = {"cycle": cycle.summary(), "grounding": grounding.summary(), "examples": examples,
              "seconds": time.perf_counter() - start, "world_size": world_size, "answer": answer}
    if generated:
        for metric in ("cycle", "grounding"):
            summary = result[metric]
            summary["no_seg"] = sum(no_seg[metric].values())
            for name, scores in summary["per_dataset"].items():
                scores["no_seg"] = no_seg[metric].get(name, 0)
    return result


def _count(counts: dict, name: str, n: int) -> None:
    counts[name] = counts.get(name, 0) + int(n)


def rank_share(n: int, rank: int, world_size: int, lockstep: bool = False) -> tuple[list[int], int]:
    """This rank's positions among n samples (every world_size-th, from `rank`) and how many of them it scores.
    lockstep: padded to the largest share (repeats of its last position, or position 0) so that every rank runs
    as many batches; the padding comes last and is not scored."""
    mine = list(range(rank, n, world_size))
    scored = len(mine)
    if lockstep and n:
        mine += [mine[-1] if mine else 0] * (-(-n // world_size) - scored)
    return mine, scored


def _vision_tokens(model, images1: list, images: list) -> tuple[dict, dict]:
    """`vision_tokens=` keyword arguments for caption(images1) and ground(images) from one tower call (a
    DualLoopModel runs its tower once per distinct image; other models get none and run their own encoders)."""
    if not hasattr(model, "vision_tokens_of"):
        return {}, {}
    tokens1, tokens = model.vision_tokens_of(images1, images)
    return {"vision_tokens": tokens1}, {"vision_tokens": tokens}


def stacked_captions(ids: list[torch.Tensor], lengths: list[torch.Tensor], pad_id: int):
    """Caption id batches of different widths as one [sum B, max T] batch (right-padded) and its lengths."""
    width = max(x.shape[1] for x in ids)
    padded = [torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), pad_id)], dim=1) for x in ids]
    return torch.cat(padded), torch.cat([torch.as_tensor(n).long().cpu() for n in lengths])


def open_eval_datasets(specs: list[dict], split: str | None = None, strict: bool = False) -> dict:
    """Open each spec without repeats; `split` overrides the split of RefCOCO-format datasets (val / testA / testB
    of RefCOCO and RefCOCO+, val / test of RefCOCOg umd); OpenImages names its splits differently (validation,
    test) and keeps its own.
    strict: a spec without its own max_bad_fraction allows no bad sample. A reader replaces a bad sample by another
    one (right for training) and leaves out refs whose image is missing: a reported figure would silently be
    on another set of samples than the split."""
    from dualloop.data import open_dataset
    from dualloop.data.mixture import parse_spec

    out = {}
    for position, spec in enumerate(specs):
        name, kind, root, _, spec = parse_spec(spec, position)  # repeats do not apply to evaluation
        if name in out:  # results are keyed by name: a second one would silently replace the first
            raise ValueError(f"two evaluation datasets are named {name!r}: give each spec a distinct 'name'")
        if split is not None and kind == "refcoco":
            spec["split"] = split
        if strict:
            spec.setdefault("max_bad_fraction", 0.0)
        out[name] = open_dataset(kind, root, **spec)
    return out


def eval_specs(cfg, split: str | None = None) -> tuple[list[dict], str | None]:
    """The dataset specs to score and the RefCOCO split to score them on: `data.eval_datasets` (their own splits
    unless `split`; `eval.split` for one without), else the training specs on `split` or `eval.split` (their own
    split is the training one)."""
    if cfg.data.eval_datasets:
        # a RefCOCO spec without a split would get the reader's default: the training split
        return [s if s.get("kind") != "refcoco" or "split" in s else {**s, "split": cfg.eval.split}
                for s in cfg.data.eval_datasets], split
    return cfg.data.datasets, split or cfg.eval.split


class TrainingEvaluator:
    """`eval.every` during training: the trainer calls it on every rank with itself and the step.

    The model is the training model (ZeRO-3 partitioned when training is): the ranks score their share of the
    samples in lockstep, and each caption phase gathers the captioning weights once, as the training step does (but
    with the trained weights, not a caption EMA). The datasets are opened once, here."""

    def __init__(self, cfg):
        from dualloop.config import ConfigError
        from dualloop.data import DataError

        specs, split = eval_specs(cfg)
        if not specs:
            raise ConfigError("eval.every is set but the config lists no data.eval_datasets or data.datasets")
        try:
            check_answer(cfg.eval.answer)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            self.datasets = open_eval_datasets(specs, split)
        except (ValueError, DataError) as e:  # an empty split, two datasets of one name: before training starts
            raise ConfigError(f"eval.every: {e}") from e
        self.cfg = cfg

    def __call__(self, trainer, step: int) -> dict:
        from dualloop.train.generation import caption_phase

        cfg = self.cfg
        modules = trainer.model.vision_language_modules()

        def phase():
            return caption_phase(trainer.engine, modules, cfg.loop.caption.gather, trainer.device,
                                 keep_gathered=cfg.loop.caption.keep_gathered)

        result = evaluate_model(trainer.model, self.datasets, samples=cfg.eval.samples,
                                batch_size=cfg.eval.batch_size, max_new_tokens=cfg.loop.caption.max_new_tokens,
                                cuda_graph=cfg.loop.caption.cuda_graph, rank=trainer.rank,
                                world_size=trainer.world, lockstep=trainer.world > 1, caption_context=phase,
                                answer=cfg.eval.answer)
        result.pop("examples")
        return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dualloop eval", description=__doc__)
    p.add_argument("--checkpoint", required=True,
                   help="a training output dir or checkpoint, an export, or a convert-sa2va directory")
    p.add_argument("--config", required=True, help="training YAML (model and data sections)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per dataset, 0 for all of it (default: eval.samples)")
    p.add_argument("--split", default=None, help="override the split of RefCOCO datasets (RefCOCO, RefCOCO+: val, "
                   "testA, testB; RefCOCOg umd: val, test; default: an eval_datasets spec's own, else eval.split)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N; "
                   "under a launcher, each rank takes its LOCAL_RANK's GPU")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def _print_table(result: dict) -> None:
    rows = [("cycle", k, v) for k, v in result["cycle"]["per_dataset"].items()]
    rows += [("grounding", k, v) for k, v in result["grounding"]["per_dataset"].items()]
    rows += [(metric, "ALL", result[metric]) for metric in ("cycle", "grounding")]
    replies = "no_seg" in result["cycle"]  # eval.answer=generated: replies without [SEG] (empty predictions)
    print(f"{'metric':<10} {'dataset':<14} {'samples':>7} {'cIoU':>7} {'gIoU':>7}"
          + (f" {'no [SEG]':>8}" if replies else ""))
    for metric, name, s in rows:
        print(f"{metric:<10} {name:<14} {s['samples']:>7} {s['ciou']:>7.3f} {s['giou']:>7.3f}"
              + (f" {s['no_seg']:>8}" if replies else ""))
    if replies:
        print("eval.answer=generated: the model's own replies; one without [SEG] is an empty prediction")


def _eval_device(name: str, world_size: int = 1) -> torch.device:
    """--device: auto picks the GPU when there is one (a model evaluated on the CPU is slow on real data). Under a
    launcher (world_size > 1) a GPU device is this rank's LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (torch {torch.__version__})")
    if device.type == "cuda" and world_size > 1:
        if device.index is not None:
            raise ValueError(f"--device {name}: with {world_size} processes each rank takes the GPU of its "
                             "LOCAL_RANK; give --device cuda or auto")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    # a GPU past the machine's would fail as "invalid device ordinal" only once the model has loaded
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        rank = f" (LOCAL_RANK {device.index})" if world_size > 1 else ""
        raise ValueError(f"--device {name}{rank}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def load_checkpoint_model(checkpoint: str, cfg, load=None):
    """`load(checkpoint, cfg)` (default `load_trained_model`) with every failure a ValueError naming --checkpoint:
    a truncated or foreign file raises what its reader raises (safetensors, torch.load, JSON, tokenizer errors),
    which a CLI would otherwise show as a traceback."""
    from dualloop.config import ConfigError
    from dualloop.train.export import load_trained_model

    if not Path(checkpoint).exists():
        raise ValueError(f"--checkpoint {checkpoint} does not exist")
    try:
        return (load or load_trained_model)(checkpoint, cfg)
    except ConfigError:
        raise  # names the checkpoint and says what is wrong already
    except Exception as e:  # noqa: BLE001 - any reader's error on a bad file: exit 2 with its message
        raise ValueError(f"--checkpoint {checkpoint}: cannot load a model from it ({type(e).__name__}: {e})") from e


def given_conventions(cfg, overrides: list[str]) -> dict:
    """The MODEL_CONVENTIONS settings that key=value `overrides` name (model.max_tiles=1, ...), as `cfg` parsed
    them: a model loaded from a checkpoint otherwise reads inputs as the checkpoint recorded."""
    from dualloop.config import MODEL_CONVENTIONS

    named = {o.split("=", 1)[0].strip() for o in overrides}
    return {k: getattr(cfg.model, k) for k in MODEL_CONVENTIONS if f"model.{k}" in named}


def _launched_world() -> int:
    """Processes started together by a launcher (deepspeed, torchrun: WORLD_SIZE); 1 for a plain run."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _join_ranks(device: torch.device) -> int:
    """Join the launcher's process group (NCCL between GPUs, gloo on the CPU); returns this rank."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def load_on_every_rank(checkpoint: str, cfg):
    """Each rank's own copy of the model to evaluate. A training checkpoint is consolidated once per node (by its
    local rank 0) into a temporary file that the node's other ranks map, instead of once per rank: consolidation
    reads every optimizer shard (with full fine-tuning ~16 bytes per parameter), and 8 ranks doing it at once can
    exhaust a node's memory. An error on any rank reaches all of them (no rank waits for a failed one)."""
    import shutil
    import socket
    import tempfile

    from dualloop.distributed import every_rank
    from dualloop.train.export import (
        consolidated_state_dict,
        load_trained_model,
        model_from_state,
        training_checkpoint,
    )

    source = training_checkpoint(checkpoint, cfg)  # the same answer (or error) on every rank
    if source is None:
        return load_trained_model(checkpoint, cfg)
    ckpt, model_cfg = source
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    state, folder, error = None, None, None
    if leader:
        try:
            state = consolidated_state_dict(ckpt)
            folder = tempfile.mkdtemp(prefix="dualloop-eval-", dir=os.environ.get("DUALLOOP_TMPDIR"))
            torch.save(state, os.path.join(folder, "consolidated.pt"))
        except Exception as e:  # noqa: BLE001 - every rank raises it below; a rank raising alone would hang the rest
            error = f"{type(e).__name__}: {e}"
    host = socket.gethostname()
    shared = every_rank((host, leader, folder, error))
    failed = [f"rank {r}: {err}" for r, (_, _, _, err) in enumerate(shared) if err]
    try:
        if failed:
            raise ValueError(f"consolidating {ckpt} failed ({'; '.join(failed)}); DUALLOOP_TMPDIR names a "
                             "node-local directory with room for the fp32 weights")
        if state is None:  # the node's leader wrote it (hostnames shared across nodes: the folder that is here)
            here = [f for h, lead, f, _ in shared if lead and h == host and f and os.path.isdir(f)]
            if not here:
                raise ValueError(f"no consolidated copy of {ckpt} on this node ({host}): is LOCAL_RANK set?")
            state = torch.load(os.path.join(here[0], "consolidated.pt"), mmap=True, weights_only=True)
        model = model_from_state(model_cfg, state, ckpt)
    finally:
        every_rank(None)  # every rank has its copy before the leader deletes the file
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    if leader:
        print(f"dualloop eval: {ckpt} consolidated once on {host} for its ranks", file=sys.stderr)
    return model


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dualloop.config import load_config
    from dualloop.data import DataError

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = 0
    try:
        # every rank checks the same arguments and files: all fail here together, before any collective
        world = _launched_world()
        cfg = load_config(args.config, args.overrides)
        # without eval specs the training specs are scored, on eval.split (theirs is the training split)
        specs, split = eval_specs(cfg, args.split)
        if not specs:
            raise ValueError(f"{args.config} lists no data.eval_datasets or data.datasets")
        samples = cfg.eval.samples if args.samples is None else args.samples  # 0: the whole split
        check_answer(cfg.eval.answer)
        if samples < 0:
            raise ValueError(f"--samples / eval.samples must be >= 0 (0: the whole split), got {samples}")
        device = _eval_device(args.device, world)
        if world > 1:
            rank = _join_ranks(device)
        model = load_checkpoint_model(args.checkpoint, cfg, load_on_every_rank if world > 1 else None).to(device)
        given = given_conventions(cfg, args.overrides)
        if given:  # the command line wins over what the checkpoint recorded (they change no weight)
            if rank == 0:
                was = {k: getattr(model.model_cfg, k) for k in given}
                print(f"dualloop eval: conventions {given} instead of the checkpoint's {was}", file=sys.stderr)
            model.use_conventions(**given)
        datasets = open_eval_datasets(specs, split, strict=True)
    except (ValueError, FileNotFoundError, DataError) as e:  # ConfigError is a ValueError; DataError: empty split
        print(f"dualloop eval: {e}", file=sys.stderr)
        return exit_after_leaving(2)  # on several ranks without the teardown, as at the end (its code kept)
    unwritten = None
    try:
        result = evaluate_model(model, datasets, samples=samples, batch_size=cfg.eval.batch_size,
                                max_new_tokens=cfg.loop.caption.max_new_tokens,
                                cuda_graph=cfg.loop.caption.cuda_graph,  # a plain model: its weights stay in place
                                rank=rank, world_size=world, answer=cfg.eval.answer)
        if rank == 0:  # every rank holds the merged scores; one reports them, before any rank may exit
            try:
                _report(result, datasets, model, args.json)
            except OSError as e:  # the other ranks still get to the barrier below
                unwritten = e
        leave_together()  # every rank gets here: none exits while another is still in the group
    except DataError as e:  # too many unreadable samples (on any rank: every rank raises it)
        if rank == 0:
            print(f"dualloop eval: {e}", file=sys.stderr)
        return exit_after_leaving(2, world)
    finally:
        leave_process_group()  # after an error (left already on success)
    if unwritten is not None:
        print(f"dualloop eval: --json {args.json}: {unwritten.strerror or unwritten}", file=sys.stderr)
    return exit_after_leaving(2 if unwritten is not None else 0, world)


def _report(result: dict, datasets: dict, model, json_path: str | None) -> None:
    """Rank 0: the table on stdout and the JSON file."""
    result.pop("examples")
    # the split each RefCOCO figure is on (set by the spec, eval.split or --split: the names need not say it)
    result["splits"] = {name: ds.split for name, ds in datasets.items() if getattr(ds, "kind", None) == "refcoco"}
    # how the model read the images (tiles, prompt text, ...): the figures depend on it as on the weights
    from dualloop.config import MODEL_CONVENTIONS

    model_cfg = getattr(model, "model_cfg", None)
    result["conventions"] = {k: getattr(model_cfg, k) for k in MODEL_CONVENTIONS if hasattr(model_cfg, k)}
    _print_table(result)
    if json_path:
        from dualloop.train.metrics import nan_to_null  # a metric without samples: NaN here, null in JSON

        Path(json_path).write_text(json.dumps(nan_to_null(result), indent=2))

