"""Processes: torchrun's environment, the process group, and starting txtrain under torch's
own elastic launcher (``launch.nproc_per_node``).

torchrun (or ``torch.distributed.run``, or a cluster launcher that sets the same variables)
gives every process RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous address. The process group
is set up before Hydra runs, so that all processes can agree on one start time, and with it on
one run directory.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime
from pathlib import Path

from txtrain.config import ConfigError


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def adopt_slurm_environment() -> bool:
    """Started by SLURM (``srun``, or submitit with one task per GPU) rather than torchrun: set
    torchrun's variables from SLURM's, so that every task joins one process group. The
    rendezvous is MASTER_ADDR/MASTER_PORT when given, else the job's first node and a port
    derived from the job id. Returns whether it did anything."""
    env = os.environ
    if under_torchrun() or int(env.get("SLURM_NTASKS", 1)) < 2 or "SLURM_PROCID" not in env:
        return False
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_NODELIST", "localhost")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
    return True


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu01`` -> ``gpu07``."""
    head = re.match(r"[^,\[]+(\[[^\]]*\])?", nodelist).group(0)
    prefix, _, ranges = head.partition("[")
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0] if ranges else prefix


def join_job() -> bool:
    """Join the process group of a job that torchrun (or SLURM) started; returns whether this
    process is part of one. NCCL for CUDA tensors and gloo for CPU tensors; gloo alone where
    there is no GPU. No GPU is bound here, before the config says whether the run uses one: a
    run on GPUs binds its own when its strategy is built (``own_gpu``). Safe to call again."""
    adopt_slurm_environment()
    if not under_torchrun():
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    store = restart_store()
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=env_rank(), world_size=env_world_size())
    return True


def own_gpu() -> int:
    """The index of this process's GPU, in a job of one process per GPU: its LOCAL_RANK's, or
    the only GPU it sees where the launcher gives each task one GPU and hides the others (SLURM's
    --gpus-per-task). A process without a GPU of its own is refused: NCCL cannot run two ranks
    on one GPU."""
    import torch

    visible = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    on_this_node = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun says how many it started here
    if on_this_node is None and visible == 1:
        return 0
    if local_rank < visible and int(on_this_node or 0) <= visible:
        return local_rank
    processes = f"{on_this_node} processes" if on_this_node else f"local rank {local_rank}"
    raise ConfigError(f"{processes} on this node but {visible} GPU{'s' * (visible != 1)} visible: each "
                      f"process needs a GPU of its own; start at most {visible} per node "
                      f"(torchrun --nproc-per-node={visible}), or train on the CPU with device=cpu")


def restart_store():
    """torchrun's agent keeps one rendezvous store for all the restarts of its workers
    (``--max-restarts``), and the env:// rendezvous reads it without telling attempts apart: a
    restarted rank can read the address a dead rank published, fail to connect, and so fail
    every restart. Give each attempt its own part of the store. None: use env:// as it is."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    global agent_store
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                env_world_size(), is_master=False)
    return dist.PrefixStore(f"txtrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                            agent_store)


agent_store = None  # torchrun's agent's store, which outlives the workers it restarts


def kept_across_restarts(key: str, decide):
    """``decide()`` once per torchrun job: a group that torchrun restarts (``--max-restarts``)
    gets what its first attempt decided, from the agent's store. Elsewhere, ``decide()``."""
    if agent_store is None:
        return decide()
    key = f"txtrain/{key}"
    if agent_store.check([key]):
        return agent_store.get(key).decode()
    value = decide()
    agent_store.set(key, value)
    return value


def decided_by_rank_0(decide):
    """``decide()`` on rank 0 alone, and its outcome on every rank: the value, or the exception
    it raised, raised on every rank. No rank waits for an answer that never comes, and a
    refusal ends every rank the same way."""
    if not under_torchrun():
        return decide()
    import pickle

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # plan=true joins no group: every rank decides alike
        return decide()
    outcome = [None]
    if env_rank() == 0:
        try:
            outcome[0] = (decide(), None)
        except Exception as error:  # noqa: BLE001 - handed to every rank, raised there
            try:
                pickle.dumps(error)
            except Exception:  # noqa: BLE001 - an exception that cannot travel: its message can
                error = RuntimeError(f"{type(error).__name__}: {error}")
            outcome[0] = (None, error)
    dist.broadcast_object_list(outcome, src=0, device=torch.device("cpu"))
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def start_time() -> datetime:
    """When this run started: rank 0's clock, shared with every other process. It is also
    handed down in the environment, so that processes started later on this run's behalf
    (submitit's jobs, launch.nproc_per_node's workers) name the same directories.

    Under torchrun it is when torchrun's agent started, which stays the same when the agent
    restarts failed workers (``--max-restarts``): they find the same run dir and resume there."""
    if STARTED_VARIABLE in os.environ:
        return datetime.fromisoformat(os.environ[STARTED_VARIABLE])
    agent_start = process_start(os.getppid()) if "TORCHELASTIC_RUN_ID" in os.environ else None
    shared = [agent_start or datetime.now()]
    if under_torchrun():
        import torch
        import torch.distributed as dist

        dist.broadcast_object_list(shared, src=0, device=torch.device("cpu"))
    os.environ[STARTED_VARIABLE] = shared[0].isoformat()
    return shared[0]


STARTED_VARIABLE = "TXTRAIN_STARTED"


def process_start(pid: int | str) -> datetime | None:
    """When process ``pid`` started, by the wall clock (Linux's /proc; None elsewhere)."""
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return datetime.fromtimestamp(boot + seconds_after_boot(pid))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def seconds_after_boot(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in clock ticks


def hydra_overrides_for_rank() -> list[str]:
    """Only rank 0 writes to the run dir (besides checkpoint shards): the other ranks do not
    open the log file (nor, see cli.record_config, save the config copy)."""
    if env_rank() == 0:
        return []
    return ["hydra.job_logging.root.handlers=[console]"]


def launch_workers(nproc_per_node: int, overrides: list[str], run_dir: str) -> None:
    """Run ``python -m txtrain <overrides>`` in ``nproc_per_node`` processes under
    torch.distributed.run, all writing to ``run_dir``; exit as the first failed worker did."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from txtrain.stopping import INTERRUPTED_STATUS

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc_per_node}", "--module", "txtrain",
         *overrides, f"hydra.run.dir={run_dir}"])
    # Share the cores among the workers (torchrun would pick 1 thread each, and say so).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    try:
        run(args)
    except ChildFailedError as failure:
        _, first = failure.get_first_failure()
        sys.exit(first.exitcode if first.exitcode > 0 else 1)
    except SignalException:  # SIGTERM or Ctrl-C: the agent passed it on and waited for the
        sys.exit(INTERRUPTED_STATUS)  # workers, which saved a checkpoint and said so


def require_launched(strategy: str, min_processes: int = 1) -> None:
    """A multi-process strategy needs torchrun (or launch.nproc_per_node) to start it."""
    how = (f"add launch.nproc_per_node=2, or start it with `torchrun --nproc-per-node=2 -m txtrain "
           f"parallel={strategy} <overrides>`")
    if not under_torchrun():
        raise ConfigError(f"parallel={strategy} runs one process per device and this is a single "
                          f"process; {how}")
    if env_world_size() < min_processes:
        raise ConfigError(f"parallel={strategy} needs at least {min_processes} processes, got "
                          f"{env_world_size()}; {how}")
