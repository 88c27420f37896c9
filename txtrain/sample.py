"""``txtrain-sample``: continue a prompt with a trained model.

    txtrain-sample outputs/2026-11-23/10-00-00 --prompt "SOCRATES:" --max-new-tokens 200
    txtrain-sample <run dir> --prompt "3 1 4 1 5" --temperature 0      (task=reverse: 5 1 4 1 3)

The argument is a run dir (its latest checkpoint), a checkpoints folder or one checkpoint.
A checkpoint holds the model's config and its task's tokenizer, so no corpus is needed.
A GPT continues the prompt; an encoder-decoder reads it as its source and prints its answer;
an encoder (``model.arch=encoder``) fills each ``[MASK]`` of the prompt and prints the
``--fills`` likeliest tokens for it with their probabilities:

    txtrain-sample <bert run dir> --prompt "SOCRATES: And what is [MASK]?"
Sampling keeps a key/value cache (``--no-cache``: rerun the model over the whole window at
every token, to compare; the tokens are the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from txtrain.config import ConfigError, ModelConfig
from txtrain.generate import ModelLogits, draw_text
from txtrain.tasks.base import Sampling

if TYPE_CHECKING:
    from txtrain.resume import CheckpointMeta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="txtrain-sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run dir, a checkpoints folder or a checkpoint folder")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a new line)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: always the likeliest token")
    parser.add_argument("--top-k", type=int, default=40, help="draw from the k likeliest (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--best", action="store_true", help="the best checkpoint (train.patience), not the latest")
    parser.add_argument("--tokenizer-file", default=None,
                        help="where the GPT-2 ranks are now, if not where training read them")
    parser.add_argument("--fills", type=int, default=5, help="an encoder: the likeliest tokens shown per mask")
    parser.add_argument("--no-cache", action="store_true",
                        help="rerun the model over the whole window at every token (slower, the same tokens)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1 or args.fills < 1:
        parser.error("--max-new-tokens, --temperature and --top-k must not be negative, "
                     "--num-samples and --fills must be positive")
    return args


def load_model(path: Path, device: torch.device):
    """The model and the meta of the checkpoint at (or under) ``path``, and the checkpoint."""
    from txtrain.checkpoint import find_checkpoint, load_model_weights
    from txtrain.model import model_class
    from txtrain.resume import CheckpointMeta

    if not path.exists():
        raise ConfigError(f"{path}: no such run dir or checkpoint")
    checkpoint = find_checkpoint(str(path), Path("."), named=str(path))
    meta = CheckpointMeta.load(checkpoint)
    model_config = ModelConfig(**meta.model_config)
    model = model_class(model_config)(model_config, meta.vocab_size)
    load_model_weights(checkpoint, model)
    return model.to(device).eval(), meta, checkpoint


def sampling_context(meta: CheckpointMeta, model) -> int:
    """The window to sample with: the one the run trained on and sampled at, so that the same
    prompt and seed draw what the run wrote in samples.txt (model.max_seq_len where the
    checkpoint does not say)."""
    return meta.context or model.cfg.max_seq_len


def check_prompt_fits(prompt_tokens: int, context: int) -> None:
    """The model sees at most ``context`` tokens: a longer prompt would lose its beginning."""
    if prompt_tokens > context:
        raise ConfigError(f"the prompt is {prompt_tokens} tokens long and the model reads at most "
                          f"{context} (the window it was trained on); shorten the prompt")


def answer(model, device: torch.device, codec, prompt: str, sampling: Sampling, seed: int,
           with_cache: bool, context: int) -> str:
    """A GPT's continuation of ``prompt``, or an encoder-decoder's answer to it, as text."""
    ids = codec.encode(prompt)
    if not model.needs_sources:
        return draw_text(ModelLogits(model, device, with_cache=with_cache), codec, ids, sampling,
                         seed, context)
    # The prompt is the source; the decoder starts from SEP, as in training. Only the
    # synthetic tasks train an encoder-decoder (config.py refuses it on text).
    from txtrain.tasks.synthetic import SEP

    next_logits = ModelLogits(model, device, sources=torch.tensor([ids]), with_cache=with_cache)
    return draw_text(next_logits, codec, [SEP], sampling, seed, context)


def check_prompt_has_masks(prompt: str, codec) -> None:
    if codec.spelling not in prompt:
        raise ConfigError(f"this checkpoint is an encoder: it fills masks, and the prompt has no "
                          f"{codec.spelling}; write one where a token is missing")


def print_fills(model, device: torch.device, codec, prompt: str, fills: int) -> None:
    """The prompt with each mask filled by its likeliest token, then each mask's ``fills``
    likeliest tokens and their probabilities."""
    from txtrain.tasks.masked import fill_masks

    with torch.no_grad():
        choices = fill_masks(model, codec, prompt, fills, device)
    pieces = prompt.split(codec.spelling)
    print("".join(piece + (f"[{shown(choices[i][0][0])}]" if i < len(choices) else "")
                  for i, piece in enumerate(pieces)))
    for i, options in enumerate(choices, start=1):
        print(f"{codec.spelling} {i}: " + " | ".join(f"{text!r} {p:.3f}" for text, p in options))


def shown(fill: str) -> str:
    """A fill as it reads in the prompt: without its leading space; white space escaped."""
    return fill.strip() or repr(fill)[1:-1]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from txtrain.checkpoint import best_checkpoint
    from txtrain.parallel.base import pick_device
    from txtrain.tasks import codec_from_checkpoint

    try:
        device = pick_device(args.device)
        args.checkpoint = best_checkpoint(Path(args.checkpoint)) if args.best else args.checkpoint
        model, meta, checkpoint = load_model(Path(args.checkpoint), device)
        codec = codec_from_checkpoint(meta.as_dict(), args.tokenizer_file)
        context = sampling_context(meta, model)
        check_prompt_fits(len(codec.encode(args.prompt)), context)  # before any work
        if model.objective == "masked":
            check_prompt_has_masks(args.prompt, codec)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"# {checkpoint} (step {meta.step})", file=sys.stderr)
    if model.objective == "masked":
        print_fills(model, device, codec, args.prompt, args.fills)
        return
    sampling = Sampling([args.prompt], args.max_new_tokens, args.temperature, args.top_k or None)
    with torch.no_grad():
        for i in range(args.num_samples):
            text = answer(model, device, codec, args.prompt, sampling, args.seed + i, not args.no_cache,
                          context)
            separator = " -> " if meta.codec["kind"] == "synthetic" else ""
            print(f"{args.prompt}{separator}{text}", flush=True)
            if i + 1 < args.num_samples:
                print("---")


if __name__ == "__main__":
    main()
