"""Step metrics: per-dataset sums over the micro-steps of an optimizer step, all-reduced over ranks in one fixed-
layout tensor (so every rank makes the same collective call), plus the writers: metrics.jsonl and TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# every component a step may report; absent ones stay at count 0 and are not written
METRIC_NAMES = ("loss", "mask_loss", "bce", "focal", "dice", "iou_head", "cycle_iou", "caption_len", "caption_loss",
                "reward", "pg_loss", "kl")
OTHER = "other"


class StepMetrics:
    """Accumulates StepOutput.values per dataset; `reduce()` all-reduces and returns plain floats."""

    def __init__(self, datasets: list[str], device: torch.device):
        self.datasets = list(dict.fromkeys(list(datasets) + [OTHER]))
        self.row = {name: i for i, name in enumerate(self.datasets)}
        self.col = {name: j for j, name in enumerate(METRIC_NAMES)}
        self.sums = torch.zeros(len(self.datasets), len(METRIC_NAMES), 2, dtype=torch.float64)
        self.device = device

    def add(self, sources: list[str], values: dict[str, torch.Tensor], valid: dict[str, torch.Tensor]) -> None:
        rows = torch.tensor([self.row.get(s, self.row[OTHER]) for s in sources])
        for name, v in values.items():
            if name not in self.col:
                continue
            v = v.detach().double().cpu()
            w = valid[name].detach().double().cpu() if name in valid else torch.ones_like(v)
            j = self.col[name]
            self.sums[:, j, 0].index_add_(0, rows, v * w)
            self.sums[:, j, 1].index_add_(0, rows, w)

    def reduce(self) -> dict:
        """Collective. The means over every rank's samples; all ranks' sums stay in `totals` (for LogWindow)."""
        import torch.distributed as dist

        t = self.sums.to(self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        self.totals = t.cpu()
        return self.summary(self.totals)

    def summary(self, t: torch.Tensor) -> dict:
        """Means (overall and per dataset, with the sample counts) of sums laid out as `sums`."""
        out: dict = {}
        total = t.sum(0)
        for name, j in self.col.items():
            if total[j, 1] > 0:
                out[name] = float(total[j, 0] / total[j, 1])
        per = {}
        for ds, i in self.row.items():
            comps = {name: float(t[i, j, 0] / t[i, j, 1]) for name, j in self.col.items() if t[i, j, 1] > 0}
            if comps:
                comps["samples"] = int(t[i, self.col["loss"], 1])
                per[ds] = comps
        out["per_dataset"] = per
        return out


class LogWindow:
    """The steps since the last metrics line (`train.log_every` > 1). A line reports their averages, as HF Trainer's
    logged loss is the mean since the previous log: the metric components over all their samples, the time per step
    and the samples per second over the window, the peak memory as its maximum; the step, lr, grad norm, skip
    fields and counters are the last step's. Logging one step's values alone made a noisy curve from 1/log_every
    of the data."""

    MEAN_PER_STEP = ("step_time_s", "time_data_s", "time_caption_s", "time_ground_s", "time_backward_s",
                     "time_optimizer_s")

    def __init__(self, samples_seen: int):
        self.samples_before = samples_seen  # samples_seen before the window's first step
        self.steps: list[tuple[StepMetrics, dict]] = []

    def add(self, metrics: StepMetrics, record: dict) -> None:
        self.steps.append((metrics, record))

    def take(self) -> dict:
        """The window's line; the next window starts empty."""
        steps, self.steps = self.steps, []
        last = steps[-1][1]
        samples, self.samples_before = last["samples_seen"] - self.samples_before, last["samples_seen"]
        if len(steps) == 1:
            return last
        records = [r for _, r in steps]
        line = {k: v for k, v in last.items() if k not in METRIC_NAMES}
        line.update(steps[-1][0].summary(sum(m.totals for m, _ in steps)))
        for key in self.MEAN_PER_STEP:
            if key in last:
                line[key] = sum(r[key] for r in records) / len(records)
        line["samples_per_s"] = samples / max(sum(r["step_time_s"] for r in records), 1e-9)
        line["peak_memory_mb"] = max(r["peak_memory_mb"] for r in records)
        return line


class MetricsWriter:
    """Rank 0 only: one JSON line per logged step (a LogWindow's) in metrics.jsonl, scalars to TensorBoard."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, resume_step: int | None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.eval_path = Path(output_dir) / "eval.jsonl"  # `eval.every`: one line per evaluation
        for path in (self.path, self.eval_path):
            _continue_lines(path, resume_step)
        self.file = open(self.path, "a")
        self.eval_file = None
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard drops the old events at steps >= purge_step: those after the checkpoint, which the resumed
            # run redoes (not the checkpoint's own step, which it does not log again); for a fresh run all of an
            # earlier run's in this output_dir (steps start at 1), or both runs were plotted on one curve
            purge = (resume_step or 0) + 1
            self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=purge)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
            for ds, comps in record.get("per_dataset", {}).items():
                for key, value in comps.items():
                    self.tb.add_scalar(f"{ds}/{key}", value, step)

    def write_eval(self, step: int, result: dict) -> None:
        """An evaluation during training (`eval.every`): eval.jsonl, and eval/ scalars in TensorBoard."""
        record = {"step": step, "seconds": result["seconds"], "answer": result.get("answer", "given"),
                  "cycle": result["cycle"], "grounding": result["grounding"]}
        if self.eval_file is None:
            self.eval_file = open(self.eval_path, "a")
        self.eval_file.write(json.dumps(nan_to_null(record)) + "\n")
        self.eval_file.flush()
        if self.tb is not None:
            for metric in ("cycle", "grounding"):
                summary = result[metric]
                for name, scores in [("all", summary), *summary["per_dataset"].items()]:
                    for key in ("ciou", "giou"):
                        if scores["samples"]:
                            prefix = "eval" if name == "all" else f"eval_{name}"
                            self.tb.add_scalar(f"{prefix}/{metric}_{key}", scores[key], step)

    def close(self) -> None:
        self.file.close()
        if self.eval_file is not None:
            self.eval_file.close()
        if self.tb is not None:
            self.tb.close()


def nan_to_null(x):
    """A metric without samples is NaN in memory, null in JSON (NaN is not JSON)."""
    if isinstance(x, dict):
        return {k: nan_to_null(v) for k, v in x.items()}
    return None if isinstance(x, float) and x != x else x


def _continue_lines(path: Path, resume_step: int | None) -> None:
    """A JSON-lines log of a run that starts (a fresh run: no old lines) or resumes at `resume_step` (it re-does the
    steps after its checkpoint: their old lines go, and a last line cut short by the kill that ended the previous
    run)."""
    if not path.is_file():
        return
    if resume_step is None:
        path.unlink()
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            record = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= resume_step:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep))
