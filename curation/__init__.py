"""curate: offline data curation for CLIP-style pre-training."""

__version__ = "0.1.0"
