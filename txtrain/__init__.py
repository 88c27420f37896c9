"""txtrain: train transformers from scratch, driven by Hydra config files."""

__version__ = "0.1.0"
