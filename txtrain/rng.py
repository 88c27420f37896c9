"""Random streams in checkpoints: each rank saves its own (Python's, the CPU generator's, and
the generator of its own GPU, or of each GPU it drives under parallel=dp), and a resume gives
each rank a stream of its own.

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


def capture_rng(devices: list[torch.device]) -> dict:
    """This process's random state; on CUDA, that of the GPUs it draws on (not of every
    visible one: a resume may see fewer). One GPU's state alone, or, for a process that drives
    several (parallel=dp: GPUs 0..n-1), a list of them in device order."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    gpus = [device for device in devices if device.type == "cuda"]
    if len(gpus) == 1:
        state["cuda"] = torch.cuda.get_rng_state(gpus[0])
    elif gpus:
        state["cuda"] = [torch.cuda.get_rng_state(gpu) for gpu in gpus]
    return state


def restore_rng(state: dict, devices: list[torch.device]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    gpus = [device for device in devices if device.type == "cuda"]
    if cuda is None or not gpus:  # saved on a CPU, or resumed on one
        return
    if not isinstance(cuda, (list, tuple)):  # one GPU's: the first GPU's now
        torch.cuda.set_rng_state(cuda, gpus[0])
        return
    for gpu in gpus:  # one state per GPU, by device index (parallel=dp's GPUs 0..n-1)
        index = gpu.index if gpu.index is not None else torch.cuda.current_device()
        if index < len(cuda):  # else no state for this GPU: keep the seeded one
            torch.cuda.set_rng_state(cuda[index], gpu)


def restore_rank_rng(saved: list[dict], rank: int, seed: int, step: int, devices: list[torch.device]) -> None:
    """Rank ``rank``'s stream from the states the ranks saved (one per rank, in rank order):
    its own where the checkpoint has one, else one derived from (seed, step, rank), so that no
    two ranks draw the same dropout masks."""
    if rank < len(saved):
        restore_rng(saved[rank], devices)
    else:
        seed_rank_stream(seed, step, rank)


def derived_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def seed_rank_stream(seed: int, step: int, rank: int) -> None:
    derived = derived_seed(seed, step, rank)
    random.seed(derived)
    torch.manual_seed(derived)  # CUDA's generators too


def seed_each_gpu(seed: int, gpus: int) -> None:
    """A stream of its own for each of the GPUs one process drives (parallel=dp's replicas draw
    from their own GPU's generator; seeded alike, every GPU's share of the batch would get the
    same dropout masks)."""
    for index in range(1, gpus):  # GPU 0 keeps the run's seed, as on one GPU
        torch.cuda.default_generators[index].manual_seed(derived_seed(seed, "gpu", index))
