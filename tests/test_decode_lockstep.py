"""Caption decoding stays in lockstep across ZeRO-3 ranks when the ranks' captions end at different tokens.

Under ZeRO-3 every decoding step's LLM forward all-gathers the weights layer by layer (`loop.caption.gather`
per_layer), so a rank that stopped decoding early would leave the others waiting in a collective forever. The caption
loop asks "has every sequence ended?" only every END_CHECK_EVERY tokens, all-reduced over the ranks when the trainer
decodes with `synced_gpus`. test_train_dist's runs decode max_new_tokens == END_CHECK_EVERY tokens, where no end
check happens at all; here max_new_tokens spans two checks, rank 0's captions end at their first token and rank 1's
never: both ranks must run every decoding step (rank 0 padding), in every gather mode, without hanging. In the
"auto" step only rank 1 finds too little free memory to gather the weights once: both must then fetch per layer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_train_dist import _launch, torchrun  # a 2-rank launch with a clean environment

from dualloop.model.composite import END_CHECK_EVERY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 90  # a hang shows as a timeout (the launcher's process group is killed); a run takes ~12 s
MAX_NEW = 2 * END_CHECK_EVERY + 1  # two end checks (after tokens 4 and 8), then a last token past them

WORKER = r'''
import collections, faulthandler, json, os, sys
faulthandler.dump_traceback_later(int(sys.argv[3]), exit=True)  # a hang prints every stack and exits
import torch
import torch.distributed as dist
from dualloop.config import load_config
import dualloop.train.generation as generation
from dualloop.train.trainer import Trainer

if int(os.environ["RANK"]) == 1:  # gather "auto": only rank 1 finds too little free memory
    generation.free_memory_bytes = lambda device: 1
tr = Trainer(load_config(sys.argv[1]))
rank = tr.rank
assert tr.world == 2 and tr.zero3

g = torch.Generator().manual_seed(rank)
h, w = (64, 64) if rank == 0 else (40, 56)  # different sizes, sources and captions on each rank too
batch = {"image1": [], "mask1": [], "image2": [], "mask2": [], "source": ["refcoco", "sa1b"] if rank == 0 else
         ["sav", "sav"], "captions": [["the red circle"], []] if rank == 0 else [[], []], "key": ["a", "b"],
         "paired": torch.tensor([False, False])}
for i in range(2):
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[h // 4: h // 2, w // 4: w // 2] = 1
    batch["image1"].append(img); batch["mask1"].append(m); batch["image2"].append(img); batch["mask2"].append(m)
tr._next_batch = lambda: batch

# rank 0: every caption ends at its first token; rank 1: no caption ever ends (EOS never wins)
eos, shift = tr.model.eos_token_id, (1e4 if rank == 0 else -1e4)
def steer(mod, args, out):
    if torch.is_grad_enabled():
        return out
    out = out.clone()
    out[..., eos] += shift
    return out
tr.model.vlm.lm_head.register_forward_hook(steer)

llm_calls = collections.Counter()  # LLM forwards per step, all of them (caption phase included)
counts = collections.Counter()  # every module's calls over the run
names = {m: n for n, m in tr.model.named_modules()}
for m in tr.model.modules():
    m.register_forward_pre_hook(lambda mod, args: counts.update([names[mod]]))
current = [0]
tr.model.language_model.register_forward_pre_hook(lambda mod, args: llm_calls.update([current[0]]))

lengths = []
inner = tr.step_fn.__call__
class Spy:
    def __call__(self, b, gen):
        out = inner(b, gen)
        lengths.append(out.values["caption_len"].tolist())
        return out
tr.step_fn = Spy()

modes, decodings = sys.argv[4].split(","), []
for step, mode in enumerate(modes):
    tr.cfg.loop.caption.gather = mode
    current[0] = step
    tr.train_step(step)
    decodings.append(tr.model.last_decoding)
mine = {"lengths": lengths, "llm_calls": [llm_calls[s] for s in range(len(modes))], "counts": dict(counts),
        "decodings": decodings}
everyone = [None, None]
dist.all_gather_object(everyone, mine)
if rank == 0:
    json.dump(everyone, open(sys.argv[2], "w"))
from dualloop.distributed import leave_together
leave_together()  # barrier + destroy: a rank exiting alone can abort at exit
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


def _run_two_ranks(tmp_path: Path, corpus: dict, mode: str, gathers: list[str]) -> list[dict]:
    cfg = {
        "model": {"preset": "tiny"},
        "data": {**corpus, "num_workers": 0},
        "loop": {"caption_grad": mode, "caption": {"max_new_tokens": MAX_NEW}, "gumbel_topk": 16,
                 "reinforce_samples": 2, "reinforce_baseline": "greedy", "reinforce_kl": 0.1,
                 "loss": {"backend": "torch", "caption": 1.0}},
        "train": {"output_dir": str(tmp_path / "run"), "steps": len(gathers), "save_every": 1000, "resume": "none",
                  "micro_batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.0, "ds_config": "zero3_bf16",
                  "progress_bar": False, "tensorboard": False},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = tmp_path / "result.json"
    rc, log = _launch(torchrun(worker, cfg_path, result, TIMEOUT - 20, ",".join(gathers)), timeout=TIMEOUT)
    if rc is None:
        pytest.fail(f"2-rank ZeRO-3 run did not finish in {TIMEOUT}s (hang?):\n{log[-5000:]}")
    assert rc == 0, log[-8000:]
    return json.loads(result.read_text())


# LLM forwards per step besides decoding: none: supervised caption + grounding; gumbel: + teacher-forced caption
# logits; reinforce (greedy baseline, KL): grounding of the K samples and of the greedy caption, caption logits, the
# reference policy's logits, supervised caption. Caption phases: reinforce's greedy baseline decodes a second time.
OTHER_LLM_CALLS = {"none": 2, "gumbel": 3, "reinforce": 5}
CAPTION_PHASES = {"none": 1, "gumbel": 1, "reinforce": 2}


@pytest.mark.parametrize("mode", ["none", "gumbel", "reinforce"])
def test_ranks_decode_in_lockstep_when_captions_end_at_different_tokens(corpus, tmp_path, mode):
    gathers = ["per_layer", "once", "auto"]  # fetched layer by layer (hooks), gathered once, decided together
    a, b = _run_two_ranks(tmp_path, corpus, mode, gathers)
    assert a["lengths"] == [[0.0, 0.0]] * len(gathers)  # rank 0: every caption ended at once ...
    assert b["lengths"] == [[float(MAX_NEW)] * 2] * len(gathers)  # ... rank 1: none ever ended
    # ... and rank 0 still ran every decoding step with rank 1 (prefill + MAX_NEW - 1 tokens per caption phase)
    per_step = CAPTION_PHASES[mode] * MAX_NEW + OTHER_LLM_CALLS[mode]
    assert a["llm_calls"] == b["llm_calls"] == [per_step] * len(gathers)
    assert a["counts"] == b["counts"]  # every module, the same number of calls on both ranks
    # "auto" with too little memory on rank 1 only: both ranks fetch per layer (the decision is all-reduced)
    assert a["decodings"] == b["decodings"] == ["dynamic", "static", "dynamic"]
