"""The ``txtrain`` command: compose the config with Hydra, validate it, train.

A mistake the user made (a bad override, an impossible value, a missing file) ends with one
line on stderr that starts with ``error:`` and exit status 2. Anything else is a bug and keeps
its traceback. A run returns its objective to Hydra, for a sweeper that optimizes it
(txtrain/objective.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from txtrain import distributed, objective, rundir
from txtrain.config import Config, ConfigError, TrainingStopped, register_configs
from txtrain.stopping import INTERRUPTED_STATUS, Interrupted, NotStarted, StopRequests

USER_ERROR_STATUS = 2
log = logging.getLogger("txtrain")


def to_config(raw: DictConfig) -> Config:
    """The composed config as typed objects; runs every schema's ``__post_init__`` checks."""
    reject_unknown_keys(raw)
    try:
        return OmegaConf.to_object(raw)
    except OmegaConfBaseException as error:  # e.g. a mandatory value left missing
        cause = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
        raise ConfigError(str(cause)) from error


def reject_unknown_keys(node: DictConfig, path: str = "") -> None:
    """Hydra lets ``+key=value`` add a key even to a typed config; a key no schema declares
    would be ignored silently, so refuse it."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        for key in node.keys():
            if key not in known:
                raise ConfigError(f"unknown key '{path}{key}' ({schema.__name__} has: "
                                  f"{', '.join(sorted(known))})")
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            reject_unknown_keys(child, f"{path}{key}.")


CONFIG_MODULE = "txtrain.configs"  # the repository's configs/, installed inside the package


def compose_config(*overrides: str) -> Config:
    """The typed config that ``txtrain *overrides`` would train with, composed without running
    anything (for scripts and tests)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(CONFIG_MODULE, version_base=None):
        return to_config(compose("train", overrides=list(overrides)))


@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="train", version_base=None)
def run(raw: DictConfig) -> float | None:
    """Train; returns the run's objective (None for a plan), the same on every rank."""
    trainer, direction = None, None
    try:
        cfg = to_config(raw)
        if cfg.plan.only:
            from txtrain.planner import plan_only  # torch loads only once the config is good

            print("\n".join(plan_only(cfg)), flush=True)
            return None
        distributed.join_job()  # for a task that submitit started (main() did it otherwise)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        direction = objective.search_direction()
        with StopRequests(cfg.train.stop_signal, starting=True) as stop:
            if cfg.launch.nproc_per_node > 1 and not distributed.under_torchrun():
                objective.check_direction(cfg.objective, None, direction)  # the workers know the task
                launch(cfg.launch.nproc_per_node, run_dir, stop)
                return objective.returned(objective.recorded(cfg.objective, run_dir), direction)
            rundir.take(run_dir)  # the workers of launch.nproc_per_node take it, not their parent
            if stop.received and not distributed.under_torchrun():  # before loading torch
                raise NotStarted(stop.received)
            from txtrain.train import Trainer  # torch loads only once the config is known to be good

            trainer = Trainer(cfg, run_dir)
            objective.check_direction(cfg.objective, trainer.task.main_metric, direction)
            if stop.agreed(trainer.device):  # every rank, whichever of them got the signal
                raise NotStarted(stop.received)
        distributed.decided_by_rank_0(lambda: record_config(raw, run_dir))  # rank 0 writes; all learn how it went
        summary = trainer.fit()
        value = distributed.decided_by_rank_0(lambda: objective.objective_value(cfg.objective, summary))
    except ConfigError as error:
        # Leave here rather than through Hydra, which would add a line of its own.
        leave_no_trace()
        exit_with_user_error(error)
    except TrainingStopped as error:
        if direction is None:
            exit_with_user_error(error, status=1)
        # In a search, a diverged trial is its worst one and the search goes on.
        worst = objective.returned(math.nan, direction)
        report_error(error, f" (this trial returns {worst}, the worst, and the search goes on)")
        if trainer is not None:
            trainer.close()
        return worst
    except (Interrupted, NotStarted) as stopped:
        if isinstance(stopped, NotStarted):
            leave_no_trace()
        if distributed.env_rank() == 0:
            print(f"stopped: {stopped}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.close()
        sys.exit(INTERRUPTED_STATUS)
    except OSError as error:  # a full disk, a folder that cannot be written: one line, here
        leave_no_trace()  # (through Hydra, it would add a line of its own)
        exit_with_user_error(cannot_write(error))
    except Exception as bug:  # not the user's doing: keep the traceback, exit 1
        raise Bug() from bug
    finally:
        rundir.let_go()
    if trainer.strategy.is_main:
        print(summary_line(summary, trainer.run_dir), flush=True)
    trainer.close()
    return objective.returned(value, direction)


def launch(nproc_per_node: int, run_dir: Path, stop: StopRequests) -> None:
    """Train in ``nproc_per_node`` processes started here; they lock the run dir themselves."""
    if stop.received:
        raise NotStarted(stop.received)
    try:
        distributed.launch_workers(nproc_per_node, list(HydraConfig.get().overrides.task),
                                   str(run_dir.resolve()))
    except SystemExit as failed:
        if failed.code:  # e.g. the workers refused the config: no empty run dir stays
            leave_no_trace()
        raise


def record_config(raw: DictConfig, run_dir: Path) -> None:
    """What Hydra would have saved in .hydra/ (it is told not to, see train.yaml): the composed
    config, Hydra's own, and the command line's overrides."""
    hydra_cfg = HydraConfig.get()
    saved = {"config.yaml": raw, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
             "overrides.yaml": hydra_cfg.overrides.task}
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in saved.items():
        (folder / name).write_text(OmegaConf.to_yaml(content), encoding="utf-8")


def leave_no_trace() -> None:
    """A refused command (or one stopped before training) leaves no folder it made behind."""
    rundir.leave_no_trace()
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        rundir.remove_empty([Path(hydra_cfg.runtime.output_dir)])  # a sweep's job folder, made by Hydra


def summary_line(summary: dict, run_dir: Path) -> str:
    parts = [f"done: step {summary['step']}"]
    for key in ("loss", "exact_match", "val_loss", "perplexity", "eval_loss"):
        if key in summary:  # run.json writes a non-finite number as null
            value = summary[key]
            parts.append(f"{key} {'nan' if value is None else f'{value:.4f}'}")
    parts.append(f"{summary['seconds']:.1f}s")
    parts.append(f"run dir {run_dir}")
    return ", ".join(parts)


NOISE = ("full_key:", "object_type=", "reference_type=", "msg:", "To append to your config",
         "Set the environment variable HYDRA_FULL_ERROR", "Config search path", "provider=",
         "invalid literal for")


def describe_error(error: BaseException) -> str:
    """One line from an exception chain. Hydra and OmegaConf spread theirs over several lines
    and chained causes; keep the informative lines, drop their bookkeeping, and fold a list of
    options ("Available options in 'model':" then one per line) into one clause."""
    lines: list[str] = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for line in str(error).splitlines():
            line = line.strip().rstrip(".")
            if (not line or line == "None" or line in lines or line.startswith(NOISE) or "$VALUE" in line
                    or (line.startswith("'") and line.endswith("'"))):
                continue
            if lines and lines[-1].endswith((":", ",")) and " " not in line:
                lines[-1] += " " + line + ","
            else:
                lines.append(line)
        # `raise ... from None` means the cause is noise: stop there.
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    message = "; ".join(line.rstrip(",") for line in lines) or "invalid configuration"
    if "not in" in message and "Key" in message:
        message += " (check the spelling; `txtrain --cfg job` prints every key)"
    return message


def main() -> None:
    # From the first moment: a stop request during start-up exits as one during training does.
    with StopRequests(starting=True):
        run_command()


class Bug(Exception):
    """An unexpected exception once Hydra has composed the config: a bug, reported with its
    traceback. Anything unexpected before that comes from an override Hydra could not apply."""

    def __str__(self) -> str:
        return "txtrain failed unexpectedly (the traceback above shows where)"


def run_command() -> None:
    rundir.made_here.clear()
    register_configs()
    OmegaConf.register_new_resolver(
        "started", lambda pattern: distributed.start_time().strftime(pattern), replace=True)
    # Let exceptions reach us instead of Hydra's own report, which exits 1 with several lines.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        arguments = hydra_arguments(sys.argv)
        with command_line(arguments), mode_known_without_composing():
            run()
    except Bug:
        raise
    except OverrideParseException as error:  # Hydra's message does not say which override
        exit_with_user_error(ConfigError(f"cannot read the override {error.override!r}: "
                                         f"{describe_error(error)}"))
    except (ConfigError, HydraException) as error:  # raised while Hydra composes the config
        rundir.leave_no_trace()
        exit_with_user_error(error)
    except OSError as error:  # a run dir that cannot be made or written, a full disk, ...
        rundir.leave_no_trace()
        exit_with_user_error(cannot_write(error))
    except KeyboardInterrupt:  # a second Ctrl-C: the user wants out now, not a traceback
        rundir.leave_no_trace()
        sys.exit(130)
    except Exception as error:  # e.g. `model=0`: Hydra raises a bare ValueError for it
        exit_with_user_error(error)


def hydra_arguments(argv: list[str]) -> list[str]:
    """The user's command line as Hydra should read it: ``plan=true`` spelled out, and what a
    plan or a torchrun worker adds."""
    arguments = [expand_plan_flag(arg) for arg in argv]
    if "plan.only=true" in arguments:
        return arguments + PLAN_ONLY_OVERRIDES
    if distributed.join_job():
        return arguments + distributed.hydra_overrides_for_rank()
    return arguments


@contextmanager
def command_line(arguments: list[str]) -> Iterator[None]:
    """``hydra.main`` reads its arguments from ``sys.argv`` and nowhere else: hand it these for
    the length of the call only."""
    saved, sys.argv = sys.argv, arguments
    try:
        yield
    finally:
        sys.argv = saved


@contextmanager
def mode_known_without_composing() -> Iterator[None]:
    """Run or sweep as the command line says (``-m`` or not), without composing the config an
    extra time to find out.

    Before it composes the config for the run, Hydra composes it once more only to read
    ``hydra.mode``, which a config file may set: a fifth of a second of every start (of each
    rank, each sweep job). No config of txtrain's own sets it (a test sees to that), so where
    every config comes from the package and no override sets the mode or the search path, the
    answer is known: no mode, and Hydra goes by ``-m``, as it does after reading the configs.
    With a config folder of the user's (``--config-dir``, a search path plugin), Hydra reads
    the mode as usual."""
    from hydra._internal.hydra import Hydra

    read_mode = Hydra.get_mode

    def get_mode(hydra_app, config_name, overrides):
        packaged = {("hydra", "hydra.conf"), ("main", CONFIG_MODULE)}  # and the schemas' store
        sources = hydra_app.config_loader.get_sources()
        if (all((source.provider, source.path) in packaged or source.provider == "schema" for source in sources)
                and not any(override.lstrip("+~").split("=", 1)[0] in ("hydra.mode", "hydra.searchpath")
                            for override in overrides)):
            return None
        return read_mode(hydra_app, config_name, overrides)

    Hydra.get_mode = get_mode
    try:
        yield
    finally:
        Hydra.get_mode = read_mode


# A plan writes nothing: no run dir, no saved config, no log file (the handler opens it lazily).
PLAN_ONLY_OVERRIDES = ["hydra.run.dir=.",
                       "hydra.job_logging.root.handlers=[console]",
                       "++hydra.job_logging.handlers.file.delay=true"]


def expand_plan_flag(arg: str) -> str:
    """``plan=true`` is short for ``plan.only=true`` (plan is a group of settings)."""
    key, _, value = arg.partition("=")
    return f"plan.only={value.lower()}" if key == "plan" and value.lower() in ("true", "false") else arg


def cannot_write(error: OSError) -> ConfigError:
    where = f" {error.filename}" if error.filename else ""
    return ConfigError(f"cannot write{where}: {error.strerror or error}")


def exit_with_user_error(error: BaseException, status: int = USER_ERROR_STATUS) -> None:
    report_error(error)
    sys.exit(status)


def report_error(error: BaseException, then: str = "") -> None:
    if distributed.env_rank() == 0:  # every rank has the same config, and the same mistake
        print(f"error: {describe_error(error)}{then}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
