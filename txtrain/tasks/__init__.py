"""Tasks build their vocabulary, their training batches and their evaluation.

The data modules (tokenizers, documents, shards, prepared datasets) need no torch, so that
``txtrain-prepare`` and its worker processes start quickly: nothing here imports it until a
task or a batch is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from txtrain.config import SyntheticTaskConfig, TextTaskConfig

if TYPE_CHECKING:
    from txtrain.tasks.base import Codec, Task

BASE_NAMES = ("IGNORE_INDEX", "Batch", "Codec", "Sampling", "Task")


def __getattr__(name: str):
    if name in BASE_NAMES:
        from txtrain.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_task(cfg, seed: int, progress: bool = True, model: type | None = None) -> Task:
    """The task's batches for the ``model`` class (``txtrain.model.model_class``) that will
    read them: a source apart from the target for the encoder-decoder (``needs_sources``),
    masked windows for the encoder (``objective == "masked"``), next tokens otherwise."""
    seq2seq = getattr(model, "needs_sources", False)
    if isinstance(cfg, SyntheticTaskConfig):
        from txtrain.tasks.synthetic import SyntheticTask

        return SyntheticTask(cfg, seed, seq2seq)
    if isinstance(cfg, TextTaskConfig) and getattr(model, "objective", "next") == "masked":
        from txtrain.tasks.masked import MaskedTextTask

        return MaskedTextTask(cfg, seed, progress)
    if isinstance(cfg, TextTaskConfig):
        from txtrain.tasks.text import TextTask

        return TextTask(cfg, seed, progress)
    raise TypeError(f"no task implements config {type(cfg).__name__}")


def codec_from_checkpoint(meta: dict, tokenizer_file: str | None = None) -> Codec:
    """The codec a checkpoint's task used, rebuilt without its data."""
    state = meta.get("codec")
    if state is None:
        raise ValueError("this checkpoint does not record its task's tokenizer (written by an "
                         "older txtrain); retrain, or resume it for a step to save a new one")
    if state["kind"] == "synthetic":
        from txtrain.tasks.synthetic import SyntheticTask

        return SyntheticTask(SyntheticTaskConfig(**state["config"]), seed=0).codec
    from txtrain.tasks.tokenizers import from_state

    return from_state(state, tokenizer_file)


__all__ = ["IGNORE_INDEX", "Batch", "Codec", "Sampling", "Task", "build_task", "codec_from_checkpoint"]
