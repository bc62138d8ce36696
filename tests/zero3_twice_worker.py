"""One-process ZeRO-3 (CPU, gloo) step of a toy net whose one block, a ZeRO-3 leaf module, runs twice per forward
(as our LLM layers run in the supervised caption and the grounding pass), through non-reentrant checkpointing:
the gradients against plain torch's. The engine is built as the trainer builds it (leaves marked, gradients
reduced per parameter). Run by tests/test_zero3_linear.py. Usage: python zero3_twice_worker.py BUCKET
-> prints one line "RESULT {json}" (per parameter: max |error| / max |gradient|).
"""
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

from dualloop.train.zero3_host import mark_zero3_leaves, per_parameter_grad_reduction  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.inp, self.block, self.head = torch.nn.Linear(d, d), Block(d), torch.nn.Linear(d, 1)

    def forward(self, x1, x2):
        a = checkpoint(self.block, self.inp(x1), use_reentrant=False)
        b = checkpoint(self.block, self.inp(x2) * 3.0, use_reentrant=False)
        return self.head(a).square().mean() + 0.7 * self.head(b).abs().mean()


def main(bucket: int) -> dict:
    deepspeed.init_distributed("gloo")
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "memory_efficient_linear": False,
                                    "stage3_param_persistence_threshold": 0, "reduce_bucket_size": bucket},
              "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        net = Net()
    mark_zero3_leaves(net, ["Block"])
    with per_parameter_grad_reduction():
        engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                          config=config)
    ref = Net()
    with deepspeed.zero.GatheredParameters(list(net.parameters())):
        ref.load_state_dict({k: v.detach().clone() for k, v in net.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(4, 7, 16, generator=g), torch.randn(4, 7, 16, generator=g)
    ref(x1, x2).backward()
    engine.backward(engine(x1, x2))
    return {n: float((deepspeed.utils.safe_get_full_grad(p) - r.grad).abs().max() / r.grad.abs().max())
            for (n, p), r in zip(net.named_parameters(), ref.parameters())}


if __name__ == "__main__":
    from dualloop.distributed import exit_after_leaving, leave_together

    print("RESULT " + json.dumps(main(int(sys.argv[1]))), flush=True)
    leave_together()
    exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
