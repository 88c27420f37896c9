"""A minimal GPT training loop in plain PyTorch: the yardstick ``bench.py`` holds txtrain to.

It computes what txtrain computes for a decoder-only model with learned positions, pre-norm
blocks, GELU, biases and tied embeddings (txtrain's defaults): the same layers, the same loss
(cross-entropy over the real vocabulary, padded rows sliced off), AdamW with the same parameter
groups, gradient clipping and the warm-up + cosine schedule. It has none of txtrain's
machinery: no config system, strategy, logging, checkpointing or memory planning. Whatever
txtrain is slower by is the cost of that machinery.

    python scripts/reference.py --tokens train.npy --vocab-size 50257 --steps 20 --json out.json

prints one line per step and, with --json, writes the step times, losses and peak memory.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, impl: str):
        super().__init__()
        self.heads, self.impl = heads, impl
        self.qkv = nn.Linear(width, 3 * width)  # one matmul for queries, keys and values
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=-1))
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, impl: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, impl)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, padded_vocab: int, seq_len: int, layers: int, heads: int,
                 width: int, impl: str = "sdpa"):
        super().__init__()
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(padded_vocab, width)
        self.wpe = nn.Embedding(seq_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads, impl) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, padded_vocab, bias=False)
        self.head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for weight in (block.attn.proj.weight, block.mlp[2].weight):
                nn.init.normal_(weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln_f(self.blocks(x)))[..., : self.vocab_size]


def lr_at(step: int, lr: float, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))  # the last step: the floor
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = {"fused": True} if args.device == "cuda" else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, **fused)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches, args):
    """Yield (loss, seconds) for each step; ``batches`` yields (inputs, targets) on the CPU."""
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    forward = torch.compile(model) if args.compile else model
    for step, (inputs, targets) in enumerate(batches):
        start = time.perf_counter()
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup_steps, args.steps, args.min_lr_ratio)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()  # waits for the device: the step is over
        yield loss, time.perf_counter() - start


def random_windows(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, steps: int):
    for step in range(steps):
        starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=batch_size)
        rows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
        yield rows[:, :-1], rows[:, 1:]


def keep_freed_memory() -> None:
    """As txtrain does on a CPU: glibc keeps large freed blocks for reuse, so the ratio
    measures the training loop, not the allocator."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", required=True, help="a .npy file of training token ids")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--vocab-multiple", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--impl", choices=["sdpa", "manual"], default="sdpa")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--beta2", type=float, default=0.98)
    parser.add_argument("--eps", type=float, default=1e-8)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    if args.device == "cpu":
        keep_freed_memory()
    if args.device == "cuda":  # TF32 matmuls, as txtrain's default (and set as txtrain does:
        torch.backends.cuda.matmul.allow_tf32 = True  # torch keeps fp32_precision in step)
    torch.manual_seed(args.seed)
    padded = -(-args.vocab_size // args.vocab_multiple) * args.vocab_multiple
    model = GPT(args.vocab_size, padded, args.seq_len, args.n_layer, args.n_head, args.n_embd,
                args.impl).to(args.device)
    optimizer = make_optimizer(model, args)
    tokens = np.load(args.tokens, mmap_mode="r")
    batches = random_windows(tokens, args.seq_len, args.batch_size, args.seed, args.steps)
    losses, seconds = [], []
    for step, (loss, took) in enumerate(train(model, optimizer, batches, args), start=1):
        losses.append(loss)
        seconds.append(took)
        print(f"step {step}: loss {loss:.4f}, {1000 * took:.0f} ms", flush=True)
    if args.json:
        result = {"losses": losses, "step_seconds": seconds, "peak_memory_bytes": peak_memory(args.device),
                  "tokens_per_step": args.batch_size * args.seq_len}
        with open(args.json, "w") as out:
            json.dump(result, out)


if __name__ == "__main__":
    main()
