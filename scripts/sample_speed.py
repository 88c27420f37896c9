"""How much faster does sampling run with the key/value cache?

Draws ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt from an untrained GPT of
``experiment=socrates``'s size (4 layers, 4 heads, width 192, GPT-2's 50257-token vocabulary;
speed does not depend on the weights), through ``txtrain.generate`` as txtrain-sample does,
with the cache and without, and prints tokens/s as a markdown table, a row per context:

    python scripts/sample_speed.py [--new-tokens 256] [--contexts 128 512] [--device cpu] [--threads 1]

The context is the model's ``max_seq_len``, the longest window it reads. Socrates's 128 is
full after 128 - prompt new tokens; from then on the cache falls back to rerunning the window
at every token, exactly as without it (``generate.Cached``), so the gain shrinks. A context of
512 holds the prompt and 256 new tokens: every token is one cached position. Each row says
whether both ways drew the same tokens (they must).
"""

from __future__ import annotations

import argparse
import time

import torch

from txtrain.config import ModelConfig
from txtrain.generate import ModelLogits, draw_tokens
from txtrain.model import build_model

GPT2_VOCAB = 50257


def build(args: argparse.Namespace, context: int) -> torch.nn.Module:
    cfg = ModelConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.width, max_seq_len=context)
    torch.manual_seed(0)
    return build_model(cfg, args.vocab).to(args.device).eval()


def timed_draw(model: torch.nn.Module, args: argparse.Namespace, prompt: list[int], context: int,
               with_cache: bool) -> tuple[float, list[int]]:
    """The best seconds of ``--repeats`` greedy draws, and the tokens drawn."""
    next_logits = ModelLogits(model, args.device, with_cache=with_cache)
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        tokens = draw_tokens(next_logits, prompt, args.new_tokens, temperature=0, context=context)
        if args.device.type == "cuda":  # the draw reads the logits on the CPU: already in step
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best, tokens


def measure(args: argparse.Namespace, context: int) -> dict:
    model = build(args, context)
    ids = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.prompt_tokens,), generator=ids).tolist()
    draw_tokens(ModelLogits(model, args.device), prompt, 4, temperature=0)  # warm up
    cached, cached_tokens = timed_draw(model, args, prompt, context, with_cache=True)
    plain, plain_tokens = timed_draw(model, args, prompt, context, with_cache=False)
    # The prompt's step, then one per token until the sequence fills the context.
    from_cache = min(args.new_tokens, context - args.prompt_tokens + 1)
    return {"context": context, "cached": args.new_tokens / cached, "plain": args.new_tokens / plain,
            "from_cache": from_cache, "same": cached_tokens == plain_tokens}


def table(rows: list[dict], new_tokens: int) -> str:
    lines = ["| context | drawn from the cache | with cache (tokens/s) | without (tokens/s) | speed-up "
             "| same tokens |", "|---:|---:|---:|---:|---:|:---|"]
    for row in rows:
        lines.append(f"| {row['context']} | {row['from_cache']} of {new_tokens} | {row['cached']:.0f} "
                     f"| {row['plain']:.0f} | {row['cached'] / row['plain']:.1f}x "
                     f"| {'yes' if row['same'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512],
                        help="model.max_seq_len of each row (socrates: 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB)
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many draws counts")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's; on a shared machine 1 measures steadiest)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompt_tokens > min(args.contexts):
        parser.error("--prompt-tokens must fit in every context")
    rows = [measure(args, context) for context in args.contexts]
    threads = torch.get_num_threads()
    print(f"{args.new_tokens} new tokens after {args.prompt_tokens}, greedy, fp32 on {args.device} "
          f"({threads} CPU thread{'s' * (threads > 1)}); {args.layers} layers, {args.heads} heads, width "
          f"{args.width}, vocabulary {args.vocab}; the best of {args.repeats}\n")
    print(table(rows, args.new_tokens))
    if not all(row["same"] for row in rows):
        raise SystemExit("the cache changed the tokens drawn")


if __name__ == "__main__":
    main()
