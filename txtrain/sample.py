"""``txtrain-sample``: continue a prompt with a trained model.

    txtrain-sample outputs/2026-11-23/10-00-00 --prompt "SOCRATES:" --max-new-tokens 200
    txtrain-sample <run dir> --prompt "3 1 4 1 5" --temperature 0      (task=reverse: 5 1 4 1 3)

The argument is a run dir (its latest checkpoint), a checkpoints folder or one checkpoint.
A checkpoint holds the model's config and its task's tokenizer, so no corpus is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from txtrain.config import ConfigError, ModelConfig
from txtrain.generate import complete
from txtrain.tasks.base import Sampling


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
    parser.add_argument("--tokenizer-file", default=None,
                        help="where the GPT-2 ranks are now, if not where training read them")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
        parser.error("--max-new-tokens, --temperature and --top-k must not be negative, "
                     "--num-samples must be positive")
    return args


def load_model(path: Path, device: torch.device):
    """The model and the task's codec of the checkpoint at (or under) ``path``."""
    from txtrain.checkpoint import find_checkpoint, load_model_weights
    from txtrain.model import model_class
    from txtrain.resume import CheckpointMeta

    if not path.exists():
        raise ConfigError(f"{path}: no such run dir or checkpoint")
    checkpoint = find_checkpoint(str(path), Path("."), named=str(path))
    meta = CheckpointMeta.load(checkpoint)
    model_config = ModelConfig(**meta.model_config)
    if model_class(model_config).needs_sources:
        raise ConfigError(f"{checkpoint} holds model.arch={model_config.arch}, which also reads a "
                          "source; txtrain-sample continues prompts with a GPT (model.arch=gpt)")
    model = model_class(model_config)(model_config, meta.vocab_size)
    load_model_weights(checkpoint, model)
    return model.to(device).eval(), meta, checkpoint


def check_prompt_fits(prompt_tokens: int, context: int) -> None:
    """The model sees at most ``context`` tokens: a longer prompt would lose its beginning."""
    if prompt_tokens > context:
        raise ConfigError(f"the prompt is {prompt_tokens} tokens long and the model reads at most "
                          f"{context} (its model.max_seq_len); shorten the prompt")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from txtrain.parallel.base import pick_device
    from txtrain.tasks import codec_from_checkpoint

    try:
        device = pick_device(args.device)
        model, meta, checkpoint = load_model(Path(args.checkpoint), device)
        codec = codec_from_checkpoint(meta.as_dict(), args.tokenizer_file)
        context = model.cfg.max_seq_len
        check_prompt_fits(len(codec.encode(args.prompt)), context)  # before any work
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"# {checkpoint} (step {meta.step})", file=sys.stderr)
    sampling = Sampling([args.prompt], args.max_new_tokens, args.temperature, args.top_k or None)

    def next_logits(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs.to(device), last_only=True)

    with torch.no_grad():
        for i in range(args.num_samples):
            text = complete(next_logits, codec, args.prompt, sampling, args.seed + i, context)
            separator = " -> " if meta.codec["kind"] == "synthetic" else ""
            print(f"{args.prompt}{separator}{text}", flush=True)
            if i + 1 < args.num_samples:
                print("---")


if __name__ == "__main__":
    main()
