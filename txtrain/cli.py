"""The ``txtrain`` command: compose the config with Hydra, validate it, train.

A mistake the user made (a bad override, an impossible value, a missing file) ends with one
line on stderr that starts with ``error:`` and exit status 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from txtrain.config import Config, ConfigError, register_configs

USER_ERROR_STATUS = 2
log = logging.getLogger("txtrain")


def to_config(raw: DictConfig) -> Config:
    """The composed config as typed objects; runs every schema's ``__post_init__`` checks."""
    try:
        return OmegaConf.to_object(raw)
    except OmegaConfBaseException as error:  # e.g. a mandatory value left missing
        cause = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
        raise ConfigError(str(cause)) from error


@hydra.main(config_path="configs", config_name="train", version_base=None)
def run(raw: DictConfig) -> dict:
    try:
        cfg = to_config(raw)
        from txtrain.train import Trainer  # torch loads only once the config is known to be good

        trainer = Trainer(cfg, Path(HydraConfig.get().runtime.output_dir))
        summary = trainer.fit()
    except ConfigError as error:
        # Leave here rather than through Hydra, which would add a line of its own.
        exit_with_user_error(error)
    if trainer.strategy.is_main:
        print(summary_line(summary, trainer.run_dir), flush=True)
    trainer.strategy.close()
    return summary


def summary_line(summary: dict, run_dir: Path) -> str:
    parts = [f"done: step {summary['step']}", f"loss {summary['loss']:.4f}"]
    for key in ("exact_match", "val_loss", "eval_loss"):
        if key in summary:
            parts.append(f"{key} {summary[key]:.4f}")
    parts.append(f"{summary['seconds']:.1f}s")
    parts.append(f"run dir {run_dir}")
    return ", ".join(parts)


def describe_error(error: BaseException) -> str:
    """One line from an exception chain: Hydra and OmegaConf spread theirs over several lines
    and causes; keep the informative lines, drop their bookkeeping."""
    lines: list[str] = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for line in str(error).splitlines():
            line = line.strip().rstrip(".")
            skip = (not line or line in lines or line.startswith(("full_key:", "object_type=",
                    "reference_type=", "To append to your config", "msg:"))
                    or line.startswith("Set the environment variable HYDRA_FULL_ERROR"))
            if not skip:
                lines.append(line)
        error = error.__cause__ or error.__context__
    message = "; ".join(lines) or "invalid configuration"
    if "not in" in message and "Key" in message:
        message += " (check the spelling; `txtrain --cfg job` prints every key)"
    return message


def main() -> None:
    register_configs()
    # Let exceptions reach us instead of Hydra's own report, which exits 1 with several lines.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        run()
    except (ConfigError, HydraException) as error:  # raised while Hydra composes the config
        exit_with_user_error(error)


def exit_with_user_error(error: BaseException) -> None:
    print(f"error: {describe_error(error)}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)


if __name__ == "__main__":
    main()
