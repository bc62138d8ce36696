"""Sa2VA-style composite model: InternVL (transformers) for region captions + SAM2 mask decoder for [SEG] grounding."""
from .build import build_model, load_model
from .composite import CaptionOutput, DualLoopModel, GroundOutput

__all__ = ["build_model", "load_model", "DualLoopModel", "CaptionOutput", "GroundOutput"]
