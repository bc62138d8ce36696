"""DeepSpeed training of the dual loop: engine (ds_config "auto" filling), gather-once caption phase, checkpoints,
the trainer (`dualloop train`, `deepspeed --module dualloop.train`, `run_training(cfg)`) and export."""
from .trainer import Trainer, TrainingAborted, main, run_training

__all__ = ["Trainer", "TrainingAborted", "main", "run_training"]
