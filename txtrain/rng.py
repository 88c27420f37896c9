"""Random streams in checkpoints: each rank saves its own (Python's, the CPU generator's, and
the generator of its own GPU), and a resume gives each rank a stream of its own.

Under the same world size a resume continues every rank's stream where it stopped, so the
losses equal those of an uninterrupted run. Under a new world size the weights, optimizer
state, step and data (a function of seed and step) still continue exactly, but the random
draws (dropout masks) cannot: the batch is split over the ranks differently anyway. What
is promised then is that every rank draws its own stream, deterministic for a given (seed,
step, world size): rank r continues the stream saved by rank r where there was one, and the
other ranks start streams derived from (seed, step, rank).
"""

from __future__ import annotations

import hashlib
import random

import torch


def capture_rng(device: torch.device) -> dict:
    """This process's random state; on CUDA, that of its own GPU only (not of every visible one:
    a resume may see fewer)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":  # saved on a CPU, or resumed on one
        return
    if isinstance(cuda, (list, tuple)):  # written before: one state per visible GPU
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):  # no state for this GPU: keep the seeded one
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def restore_rank_rng(saved: list[dict], rank: int, seed: int, step: int, device: torch.device) -> None:
    """Rank ``rank``'s stream from the states the ranks saved (one per rank, in rank order):
    its own where the checkpoint has one, else one derived from (seed, step, rank), so that no
    two ranks draw the same dropout masks."""
    if rank < len(saved):
        restore_rng(saved[rank], device)
    else:
        seed_rank_stream(seed, step, rank)


def seed_rank_stream(seed: int, step: int, rank: int) -> None:
    derived = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little") >> 1
    random.seed(derived)
    torch.manual_seed(derived)  # CUDA's generators too
