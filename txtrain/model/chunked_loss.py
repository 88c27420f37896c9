"""The output head and the cross-entropy as one operation that never holds the whole logits.

A (tokens x vocabulary) logits matrix is the largest tensor of a small model's step: at 50k
words and 2k tokens, 400 MB in fp32, and the plain loss keeps several of them (the logits,
their fp32 copy, the log-probabilities, their gradient). ``ChunkedHeadLoss`` runs the head and
the loss over ``chunk_tokens`` tokens at a time, and computes the gradients while it has each
chunk's logits: their log-probabilities (one fused kernel, made in place of fp32 logits) give
the loss, then become the softmax and the logits' gradient in place (softmax - target), which adds
the chunk's share to the hidden states' and the weight's gradients. Backward only scales those
by the loss's incoming gradient. No (tokens x vocabulary) tensor outlives a chunk, and each
chunk's logits are computed and passed over once: the plain path's three head matmuls, none
recomputed.

Numerics: the matmul runs in the compute dtype (autocast's, as ``nn.Linear`` would, else the
weight's), the log-softmax and the loss in fp32, as the plain path (``logits.float()`` and
``F.cross_entropy``) does. The
gradient of the logits goes back to the compute dtype for the two gradient matmuls, as
autocast's linear does; both gradients are summed in fp32 and scaled in fp32.

Label smoothing is torch's (``F.cross_entropy``): over the real vocabulary's classes, ignored
targets excluded. The padded rows of the weight never enter the logits; their gradient is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # as txtrain.tasks.base's (the model package does not import the tasks)
DEFAULT_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class TokenLoss:
    """How hidden states and targets become a loss: cross-entropy summed over the targets
    that are not ``ignore_index``, divided by ``divide_by`` (a step's global target count).
    ``chunk_tokens`` > 0: through ``ChunkedHeadLoss``; 0: the plain path, the whole logits
    and ``F.cross_entropy``. ``hits``: also return, per token, whether the argmax is the
    target (evaluation's accuracy), as (loss, hits)."""

    label_smoothing: float = 0.0
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    divide_by: float = 1.0
    ignore_index: int = IGNORE_INDEX
    hits: bool = False
    skip_ignored: bool = True  # ignored rows never reach the head (finding them costs a host sync)

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 vocab_size: int):
        """``hidden`` (..., C) after the final norm, ``weight`` the head's (V_padded, C),
        ``targets`` (...)."""
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if self.chunk_tokens <= 0:
            logits = F.linear(hidden, weight)
            if logits.shape[-1] > vocab_size:
                logits = logits[..., :vocab_size]
            return self.from_logits(logits, targets)
        if self.skip_ignored and not self.hits:
            # Ignored targets add nothing: their rows never reach the head (BERT's unchosen 85%,
            # a toy task's prompt). One host sync, for the count.
            keep = (targets != self.ignore_index).nonzero().squeeze(1)
            if keep.numel() < targets.numel():
                hidden, targets = hidden[keep], targets[keep]
        dtype = compute_dtype(hidden, weight)
        if self.hits or not torch.is_grad_enabled():
            loss, hits = chunked_forward(hidden.to(dtype), weight[:vocab_size].to(dtype), targets,
                                         self.ignore_index, self.label_smoothing,
                                         self.chunk_tokens, want_hits=self.hits)
        else:
            loss, hits = ChunkedHeadLoss.apply(hidden, weight, targets, vocab_size, dtype,
                                               self.ignore_index, self.label_smoothing,
                                               self.chunk_tokens), None
        loss = loss / self.divide_by
        return (loss, hits) if self.hits else loss

    def from_logits(self, logits: torch.Tensor, targets: torch.Tensor):
        """The same loss from logits that exist already (the plain path; the pipeline's
        evaluation, whose last stage hands over logits)."""
        logits, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum",
                               label_smoothing=self.label_smoothing) / self.divide_by
        if not self.hits:
            return loss
        return loss, logits.argmax(-1) == targets


def evaluation_loss(forward, args: tuple, targets: torch.Tensor, loss: TokenLoss):
    """``loss`` of ``forward(*args)`` against ``targets``, for a task's evaluation: through
    the model's own head and loss where ``forward`` takes targets (a model, or a strategy's
    forward, which says ``takes_targets``), else from the logits it returns (an oracle in a
    test, a plain function)."""
    if isinstance(forward, torch.nn.Module) or getattr(forward, "takes_targets", False):
        return forward(*args, targets=targets, loss=loss)
    logits = forward(*args)
    return loss.from_logits(logits, targets.to(logits.device))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The head matmul's dtype: autocast's where it is on, else the weight's and hidden
    states' common one."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def chunk_losses(logp: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                 smoothing: float) -> torch.Tensor:
    """For log-probabilities ``logp`` (n, V), fp32 or wider, and ``targets`` (n,), a class on
    every row (any on an ignored one): each row's loss, 0 where not ``valid``, as
    F.cross_entropy (label smoothing included) takes it from the same log-probabilities."""
    loss = -(1.0 - smoothing) * logp.gather(1, targets[:, None]).squeeze(1)
    if smoothing > 0:
        loss = loss - (smoothing / logp.shape[-1]) * logp.sum(-1)
    return loss.masked_fill(~valid, 0.0)


def chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ignore_index: int, smoothing: float, chunk: int, want_hits: bool = False,
                    then: Callable[..., None] | None = None):
    """The loss sum and (``want_hits``) each row's argmax == target. ``hidden`` (N, C) and
    ``weight`` (V, C), the real rows only, in the compute dtype. ``then(rows, p, classes,
    valid, spare)``, if given, gets each chunk's softmax (fp32 or wider, made in place of its
    log-probabilities) once its loss is taken, and may overwrite it, with the chunk's target
    classes (0 on ignored rows), which rows count, and a free buffer of p's shape in the
    compute dtype (p itself where p is in the compute dtype)."""
    n = hidden.shape[0]
    valid = targets != ignore_index
    classes = targets.masked_fill(~valid, 0)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    hits = torch.empty(n, dtype=torch.bool, device=hidden.device) if want_hits else None
    # Every chunk's logits in the same buffer, and their log-probabilities in it too where the
    # logits are fp32 (else in a second one). A new (chunk x V) tensor per chunk does not reuse
    # the last one's memory on a CPU: small tensors made in between split the freed block, and
    # the heap grew by a chunk's logits per chunk.
    shape = (min(chunk, n), weight.shape[0])
    products = torch.empty(shape, dtype=hidden.dtype, device=hidden.device)
    wide = torch.promote_types(hidden.dtype, torch.float32)  # the loss's dtype: fp32 at least
    log_probs = products if products.dtype == wide else torch.empty(shape, dtype=wide, device=hidden.device)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        z = torch.mm(hidden[rows], weight.T, out=products[: rows.stop - start])
        if want_hits:
            hits[rows] = z.argmax(-1) == targets[rows]
        # One fused kernel, a row at a time (max, exp-sum, shift): fewer passes over the chunk
        # than a max, shift, exp, sum and divide of its own. In place of fp32 logits: each row
        # is read whole before any of it is written, on the CPU and the GPU kernels alike.
        logp = torch.log_softmax(z, -1, dtype=wide, out=log_probs[: rows.stop - start])
        total += chunk_losses(logp, classes[rows], valid[rows], smoothing).sum()
        if then is not None:
            then(rows, logp.exp_(), classes[rows], valid[rows], z)
    return total, hits


class ChunkedHeadLoss(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight[:vocab_size].T, targets), chunk by chunk,
    with its gradients: forward saves the gradients for a loss gradient of 1 (fp32), backward
    scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, dtype, ignore_index, smoothing, chunk):
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if want_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight[:vocab_size].to(dtype)

            def into_gradients(rows: slice, z: torch.Tensor, classes: torch.Tensor,
                               valid: torch.Tensor, spare: torch.Tensor) -> None:
                # z, the softmax, becomes d(loss)/d(logits): softmax - (1 - smoothing) * one-hot
                # - smoothing / V; then the chunk's share of both gradients. Ignored rows add
                # nothing: they are zeroed on the (rows x width) side, not the (rows x V) one,
                # which would be one more pass over the chunk (and in training every row counts).
                z.scatter_add_(1, classes[:, None], torch.full((len(classes), 1), smoothing - 1.0,
                                                               device=z.device))
                if smoothing > 0:
                    z.sub_(smoothing / vocab_size)
                g = z if z.dtype == dtype else spare.copy_(z)  # the compute dtype's copy, for the matmuls
                keep = valid[:, None].to(dtype)
                if want_h:
                    grad_h[rows] = (g @ w) * keep
                if want_w:
                    kept = h[rows] * keep
                    if g.dtype == torch.float32:
                        grad_w[:vocab_size].addmm_(g.T, kept)
                    else:
                        grad_w[:vocab_size] += (g.T @ kept).float()

            total, _ = chunked_forward(h, w, targets, ignore_index, smoothing, chunk, then=into_gradients)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # Scaled in place: a scaled copy of the head's (V x C) gradient, made at the start of
        # backward while every activation is still held, would add its size to the step's
        # peak. A second backward through the same graph (retain_graph=True) is refused by
        # autograd, which sees the saved tensors modified.
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h.mul_(grad_total).to(hidden_dtype),
                None if grad_w is None else grad_w.mul_(grad_total).to(weight_dtype),
                None, None, None, None, None, None)
