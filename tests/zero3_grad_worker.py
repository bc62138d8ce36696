"""One ZeRO-3 dual-loop step of the trainer (`Trainer.train_step`, CPU, gloo, fp32) against the same step in plain
torch on a copy of the weights: every trainable parameter's gradient, read just before the update. With several
ranks (torch.distributed.run) each rank trains on its own batches, and with train.grad_accum > 1 on several
micro-batches: the reference is the mean of the plain-torch gradients over all of them, with the trainer's own
sampling seeds. Run by tests/test_zero3_grads.py in a subprocess (DeepSpeed's state is global).
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
from dualloop.train.trainer import Trainer, _micro_seed  # noqa: E402


def main(config_path: str) -> dict:
    cfg = load_config(config_path)
    tr = Trainer(cfg)
    with deepspeed.zero.GatheredParameters(list(tr.model.parameters())):
        weights = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}

    # the trainer's own step, observed: its batches, its losses, and the gradients just before the update
    mine, my_losses, my_captions, zero3 = [], [], [], {}
    next_batch, step_fn, engine_step = tr._next_batch, tr.step_fn, tr.engine.step

    def record_batch():
        mine.append(next_batch())
        return mine[-1]

    def record_loss(batch, generator):
        out = step_fn(batch, generator)
        my_losses.append(float(out.loss))
        my_captions.append(out.captions)
        return out

    def grads_then_step():
        if tr.engine.is_gradient_accumulation_boundary():
            zero3.update({n: deepspeed.utils.safe_get_full_grad(p).detach().clone()
                          for n, p in tr.model.named_parameters() if p.requires_grad})
        return engine_step()

    tr._next_batch, tr.step_fn, tr.engine.step = record_batch, record_loss, grads_then_step
    tr.train_step(0)
    assert zero3 and len(mine) == cfg.train.grad_accum

    # (rank, micro) of each batch: the trainer seeds each micro-step's sampling noise with them
    batches = [(tr.rank, m, b) for m, b in enumerate(mine)]
    losses = my_losses
    if tr.world > 1:  # every rank's batches and losses, for the reference on rank 0
        everyone, all_losses = [None] * tr.world, [None] * tr.world
        dist.all_gather_object(everyone, batches)
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
    ref_losses, ref_captions, per_batch = [], [], []
    for rank, micro, b in batches:  # DeepSpeed averages over ranks and micro-steps
        plain.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(_micro_seed(cfg.train.seed, 0, micro, rank))
        ref = DualLoopStep(plain, cfg.loop, device="cpu")(b, gen)
        ref.loss.backward()
        ref_losses.append(float(ref.loss))
        ref_captions.append(ref.captions)
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
    keys = {str(b["key"]) for _, _, b in batches}
    return {"loss": losses, "ref_loss": ref_losses, "world": tr.world, "different_batches": len(keys) == len(batches),
            "same_captions": my_captions == ref_captions if tr.world == 1 else None,
            "errors": errors, "nonzero": sum(float(g.abs().max()) > 0 for g in zero3.values()),
            "leaves": len(deepspeed.utils.get_z3_leaf_modules(tr.model)),
            "reduce_bucket_size": tr.engine.zero_reduce_bucket_size()}


if __name__ == "__main__":
    from dualloop.distributed import exit_after_leaving, leave_together

    result = main(sys.argv[1])
    if result:
        print("RESULT " + json.dumps(result), flush=True)
    leave_together()  # rank 1 is done long before rank 0's reference: exiting alone, it aborted at exit in CI
    exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
