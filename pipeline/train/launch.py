"""The stage-independent start of a training run: validate, set up the run folder, init
distributed, run the Trainer. `albef pretrain` and `albef finetune retrieval` both go through
`run_training`, so config errors, exit codes and the run-folder layout are the same everywhere.

Run folder: DIR/config.yaml (resolved config, git SHA in a comment), DIR/checkpoints/ (DeepSpeed
tags + `latest`), DIR/tensorboard/ (rank 0 event files).

Exit codes (pipeline/runtime/preemption.py): 0 finished, 75 preempted (checkpoint saved, requeue me),
2 bad configuration (nothing started), 1 any other failure (e.g. a non-finite loss).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import REPO_ROOT, ConfigError, to_dict, to_yaml
from pipeline.data import TooManyBadSamples
from pipeline.runtime.distributed import DistInfo, dist_info_from_env, init_distributed
from pipeline.runtime.ds_config import build_ds_config, resolve_device
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE, FAILED_EXIT_CODE
from pipeline.runtime.io import CheckpointReadError, write_text_atomic
from pipeline.runtime.logs import setup_logging
from pipeline.train.geometry import derive_geometry
from pipeline.train.task import TrainTask
from pipeline.train.trainer import NonFiniteLossError, Trainer

logger = logging.getLogger(__name__)

# Keys the launchers add to the command line that are not config fields (`deepspeed` passes --local_rank).
LAUNCHER_KEYS = ("local_rank",)


def strip_launcher_keys(overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (overrides or {}).items() if k not in LAUNCHER_KEYS}


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_config(cfg: Any, run_dir: Path) -> None:
    """DIR/config.yaml, atomically, with the code version in a comment."""
    write_text_atomic(run_dir / "config.yaml", f"# resolved config; git {git_sha()}\n" + to_yaml(cfg))


def config_error_exit(err: ConfigError) -> int:
    """Log one line naming the key and return the documented exit code (nothing was written)."""
    setup_logging(0)
    logger.error("%s", err)
    return CONFIG_ERROR_EXIT_CODE


def run_training(
    cfg: Any,
    output_dir: str | Path,
    resume: str | None,
    make_task: Callable[[DistInfo], TrainTask],
    check: Callable[[Any, DistInfo, str], None] | None = None,
) -> int:
    """Validate `cfg` against the runtime and the data, then train; returns the exit code.

    `cfg` has sections train/optim/deepspeed/logging (+ the task's own). `check(cfg, dist, device)`
    adds the stage's file-system checks (raising ConfigError). Nothing is written and no process
    group is started before every check passed, the data was sized and the geometry derived.
    """
    info = dist_info_from_env()
    setup_logging(info.rank)
    try:
        device = resolve_device(cfg.train.device)
        if check is not None:
            check(cfg, info, device)
        task = make_task(info)
        try:
            samples = task.samples_per_epoch()
        except (OSError, ValueError) as err:
            raise ConfigError("data.train", str(err)) from None
        geometry = derive_geometry(
            cfg.train,
            cfg.optim,
            world_size=info.world_size,
            samples_per_epoch=samples,
            queue_size=task.queue_size(),
            epoch_unit=task.epoch_unit(),
            source_shares=task.source_shares(),
        )
        ds_config = build_ds_config(cfg.deepspeed.config, geometry=geometry, optim=cfg.optim, device=device)
    except ConfigError as err:
        logger.error("%s", err)
        return CONFIG_ERROR_EXIT_CODE
    run_dir = Path(output_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, run_dir)
    if device == "cpu" and cfg.train.cpu_threads is not None:
        torch.set_num_threads(cfg.train.cpu_threads)
    init_distributed(info, device)
    trainer = Trainer(
        task,
        train=cfg.train,
        optim=cfg.optim,
        logging_cfg=cfg.logging,
        ds_config=ds_config,
        dist_info=info,
        device=device,
        run_dir=run_dir,
        geometry=geometry,
        resolved_config=to_dict(cfg),
    )
    try:
        return trainer.fit(resume)
    except (NonFiniteLossError, CheckpointReadError) as err:  # the latter: a --resume file that is not weights-only
        logger.error("%s", err)
        return FAILED_EXIT_CODE
    except TooManyBadSamples as err:  # possibly re-raised from a loader worker, its traceback in the message
        logger.error("%s", TooManyBadSamples.one_line(err))
        return FAILED_EXIT_CODE
