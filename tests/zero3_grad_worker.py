"""One ZeRO-3 dual-loop step of the trainer (CPU, gloo, fp32) against the same step in plain torch on a copy of the
weights: every trainable parameter's gradient. Run by tests/test_zero3_grads.py in a subprocess (DeepSpeed's state
is global). Usage: python zero3_grad_worker.py CONFIG.yaml -> prints one line "RESULT {json}".
"""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from dualloop.config import load_config  # noqa: E402
from dualloop.loop.step import DualLoopStep  # noqa: E402
from dualloop.model import build_model  # noqa: E402
from dualloop.train.generation import start_zero3_pass  # noqa: E402
from dualloop.train.trainer import Trainer  # noqa: E402


def main(config_path: str) -> dict:
    cfg = load_config(config_path)
    tr = Trainer(cfg)
    batch = tr._next_batch()
    with deepspeed.zero.GatheredParameters(list(tr.model.parameters())):
        weights = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}

    start_zero3_pass(tr.engine)
    out = tr.step_fn(batch, torch.Generator().manual_seed(0))
    tr.engine.backward(out.loss)
    zero3 = {n: deepspeed.utils.safe_get_full_grad(p).detach().clone()
             for n, p in tr.model.named_parameters() if p.requires_grad}

    plain = build_model(cfg.model)
    plain.load_state_dict(weights, strict=False)
    plain.train()
    if cfg.train.activation_checkpointing:
        plain.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = DualLoopStep(plain, cfg.loop, device="cpu")(batch, torch.Generator().manual_seed(0))
    ref.loss.backward()
    grads = dict(plain.named_parameters())
    errors = {}
    for name, g in zero3.items():
        r = grads[name].grad
        r = torch.zeros_like(g) if r is None else r
        errors[name] = float((g - r).abs().max()) / max(float(r.abs().max()), 1e-12)
    return {"loss": float(out.loss), "ref_loss": float(ref.loss), "same_captions": out.captions == ref.captions,
            "errors": errors, "nonzero": sum(float(g.abs().max()) > 0 for g in zero3.values()),
            "leaves": len(deepspeed.utils.get_z3_leaf_modules(tr.model)),
            "reduce_bucket_size": tr.engine.zero_reduce_bucket_size()}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])))
