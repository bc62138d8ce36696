"""Step metrics: per-dataset sums over the micro-steps of an optimizer step, all-reduced over ranks in one fixed-
layout tensor (so every rank makes the same collective call), plus the writers: metrics.jsonl and TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# every component a step may report; absent ones stay at count 0 and are not written
METRIC_NAMES = ("loss", "mask_loss", "bce", "focal", "dice", "cycle_iou", "caption_len", "caption_loss", "reward",
                "pg_loss", "kl")
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
        import torch.distributed as dist

        t = self.sums.to(self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        t = t.cpu()
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


class MetricsWriter:
    """Rank 0 only: one JSON line per step in metrics.jsonl, scalars to TensorBoard."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, resume_step: int | None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            # a resumed run re-does the steps after its checkpoint: drop their old lines (and a last line cut
            # short by the kill that ended the previous run)
            keep = []
            for ln in self.path.read_text().splitlines():
                try:
                    record = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= resume_step:
                    keep.append(ln)
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=resume_step)

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

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
