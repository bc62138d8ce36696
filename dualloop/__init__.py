"""dualloop: dual-loop (caption → ground) fine-tuning of Sa2VA-style grounded-segmentation VLMs."""

__version__ = "0.1.0"
