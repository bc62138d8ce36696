"""One dual-loop micro-step (caption phase -> grounding phase -> losses) in three gradient modes.

    step = DualLoopStep(model, cfg.loop, caption_context=..., synced_gpus=..., device=...)
    out = step(batch, generator)      # StepOutput: loss, per-sample values per dataset, captions, timings
"""
from .step import CAPTION_GRAD_MODES, DualLoopStep, StepOutput, validate_loop_config

__all__ = ["CAPTION_GRAD_MODES", "DualLoopStep", "StepOutput", "validate_loop_config"]
