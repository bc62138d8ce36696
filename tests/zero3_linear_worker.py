"""One-process ZeRO-3 (CPU, gloo) run of a small checkpointed MLP: gradients with DeepSpeed's
`memory_efficient_linear` on or off, and the caption phase's hook hiding (`zero3_hooks_removed`).

Run by tests/test_zero3_linear.py in a subprocess: DeepSpeed's F.linear patch and process group are global.
Usage: python zero3_linear_worker.py true|false [leaf] [fast]   -> prints one line "RESULT {json}".
`leaf`: the blocks are DeepSpeed leaf modules (fetched whole), as `train.zero3_leaf_modules` makes them.
`fast`: ZeRO-3's backward-hook Functions without per-call signature binding (`fast_backward_hook_functions`).
"""
import inspect
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from dualloop.train.generation import zero3_hooks_removed  # noqa: E402

PLAIN_LINEAR = F.linear


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(d), torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(3))
        self.head = torch.nn.Linear(d, 1, bias=False)

    def forward(self, x):
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False)
        return self.head(x).square().mean()


def main(mem_efficient: bool, leaf: bool = False, fast: bool = False) -> dict:
    deepspeed.init_distributed("gloo")
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "memory_efficient_linear": mem_efficient,
                                    "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0},
              "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        net = Net()
    if leaf:  # as the trainer does it: train.zero3_leaf_modules
        from dualloop.train.zero3_host import mark_zero3_leaves

        mark_zero3_leaves(net, ["Block"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    swapped = 0
    if fast:
        from dualloop.train.zero3_host import fast_backward_hook_functions

        swapped = fast_backward_hook_functions(net)
    offload = engine.optimizer.parameter_offload
    signature_calls = [0]
    real_signature = inspect.signature

    def counting_signature(*a, **k):
        signature_calls[0] += 1
        return real_signature(*a, **k)
    inspect.signature = counting_signature
    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(1))
    ref = Net()  # plain torch copy of the current weights: the gradients ZeRO-3 must reproduce

    def run() -> tuple[float, list[list[float]], float]:
        with deepspeed.zero.GatheredParameters(list(net.parameters())):
            ref.load_state_dict({k: v.detach().clone() for k, v in net.state_dict().items()})
        ref.zero_grad()
        ref(x).backward()
        loss = engine(x)
        engine.backward(loss)
        grads = [deepspeed.utils.safe_get_full_grad(p).flatten() for p in net.parameters()]
        engine.step()
        err = max(float((g - r.grad.flatten()).abs().max()) for g, r in zip(grads, ref.parameters()))
        return float(loss), [g.tolist() for g in grads], err

    loss0, grads0, err0 = run()

    # hide the hooks of blocks[1] for a block that runs it without ZeRO-3 (weights gathered), as the caption phase does
    sub = net.blocks[1]
    dicts_before = {n: (id(m._forward_pre_hooks), id(m._forward_hooks), len(m._forward_pre_hooks),
                        len(m._forward_hooks)) for n, m in sub.named_modules()}
    other_calls = []
    other = sub.up.register_forward_hook(lambda *a: other_calls.append("kept"))
    handles_before = (len(offload.forward_hooks), len(offload.backward_hooks))

    def ds_hooks(root):
        return [h for m in root.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values()
                if getattr(h, "__module__", "").startswith("deepspeed")]
    had_ds = bool(ds_hooks(sub))
    with deepspeed.zero.GatheredParameters(list(sub.parameters())), zero3_hooks_removed(engine, [sub]):
        hidden_ds = had_ds and not ds_hooks(sub)
        with torch.no_grad():
            sub(x)
        added = sub.down.register_forward_hook(lambda *a: other_calls.append("added"))
        other.remove()  # removed during the block: must stay removed
    dicts_after = {n: (id(m._forward_pre_hooks), id(m._forward_hooks), len(m._forward_pre_hooks),
                       len(m._forward_hooks) - (1 if m is sub.down else 0)) for n, m in sub.named_modules()}
    loss1, grads1, err1 = run()  # ZeRO-3 forward/backward through the restored hooks (params partitioned again)
    added.remove()
    return {"plain_linear": F.linear is PLAIN_LINEAR, "loss0": loss0, "grads0": grads0, "loss1": loss1,
            "grads1": grads1, "err0": err0, "err1": err1, "hidden_ds": hidden_ds, "other_calls": other_calls,
            "same_dicts": dicts_before == dicts_after,
            "same_handles": handles_before == (len(offload.forward_hooks), len(offload.backward_hooks)),
            "partitioned": all(p.data.numel() == 0 for p in net.parameters()),
            "leaves": len(deepspeed.utils.get_z3_leaf_modules(net)), "swapped": swapped,
            "signature_calls": signature_calls[0]}


if __name__ == "__main__":
    from dualloop.distributed import exit_after_leaving, leave_together

    print("RESULT " + json.dumps(main(sys.argv[1] == "true", leaf="leaf" in sys.argv[2:], fast="fast" in sys.argv[2:])),
          flush=True)
    leave_together()
    exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
