"""One ZeRO-3 dual-loop step of the trainer (CPU, gloo, fp32) against the same step in plain torch on a copy of the
weights: every trainable parameter's gradient. With several ranks (torch.distributed.run) each rank trains on its
own batches, and with train.grad_accum > 1 on several micro-batches: the reference is the mean of the plain-torch
gradients over all of them. Run by
tests/test_zero3_grads.py in a subprocess (DeepSpeed's state is global).
Usage: python zero3_grad_worker.py CONFIG.yaml -> rank 0 prints one line "RESULT {json}".
"""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dualloop.config import load_config  # noqa: E402
from dualloop.loop.step import DualLoopStep  # noqa: E402
from dualloop.model import build_model  # noqa: E402
from dualloop.train.engine import engine_pass  # noqa: E402
from dualloop.train.trainer import Trainer  # noqa: E402


def main(config_path: str) -> dict:
    cfg = load_config(config_path)
    tr = Trainer(cfg)
    with deepspeed.zero.GatheredParameters(list(tr.model.parameters())):
        weights = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}

    mine, my_losses = [], []
    for micro in range(cfg.train.grad_accum):  # as the trainer steps: engine.step() after every micro-step
        batch = tr._next_batch()
        out = engine_pass(tr.engine, lambda b=batch: tr.step_fn(b, torch.Generator().manual_seed(0)))
        tr.engine.backward(out.loss)  # DeepSpeed divides by grad_accum
        if micro + 1 < cfg.train.grad_accum:
            tr.engine.step()  # not a boundary: no update, the gradients accumulate
        mine.append(batch)
        my_losses.append(float(out.loss))
    zero3 = {n: deepspeed.utils.safe_get_full_grad(p).detach().clone()
             for n, p in tr.model.named_parameters() if p.requires_grad}

    batches, losses = mine, my_losses
    if tr.world > 1:  # every rank's batches and losses, for the reference on rank 0
        everyone, all_losses = [None] * tr.world, [None] * tr.world
        dist.all_gather_object(everyone, mine)
        dist.all_gather_object(all_losses, my_losses)
        batches = [b for bs in everyone for b in bs]
        losses = [x for xs in all_losses for x in xs]
    if tr.rank != 0:
        return {}
    plain = build_model(cfg.model)
    plain.load_state_dict(weights, strict=False)
    plain.train()
    if cfg.train.activation_checkpointing:
        plain.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_losses, per_batch = [], []
    for b in batches:  # DeepSpeed averages over ranks and micro-steps
        plain.zero_grad(set_to_none=True)
        ref = DualLoopStep(plain, cfg.loop, device="cpu")(b, torch.Generator().manual_seed(0))
        ref.loss.backward()
        ref_losses.append(float(ref.loss))
        per_batch.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                          for n, p in plain.named_parameters() if n in zero3})
    errors = {}
    # relative to the largest per-batch gradient of the parameter (the ranks' gradients may cancel in the mean), with
    # a floor: some attention q/k gradients are zero up to rounding (1e-10), and rounding differs between processes
    scales = {n: max(float(grads[n].abs().max()) for grads in per_batch) for n in zero3}
    floor = 1e-6 * max(scales.values())
    for name, g in zero3.items():
        r = sum(grads[name] for grads in per_batch) / len(per_batch)
        errors[name] = float((g - r).abs().max()) / max(scales[name], floor)
    return {"loss": losses, "ref_loss": ref_losses, "same_captions": out.captions == ref.captions if tr.world == 1
            else None, "world": tr.world, "different_batches": len({str(b["key"]) for b in batches}) == len(batches),
            "errors": errors, "nonzero": sum(float(g.abs().max()) > 0 for g in zero3.values()),
            "leaves": len(deepspeed.utils.get_z3_leaf_modules(tr.model)),
            "reduce_bucket_size": tr.engine.zero_reduce_bucket_size()}


if __name__ == "__main__":
    result = main(sys.argv[1])
    if result:
        print("RESULT " + json.dumps(result))
