"""The stage-independent start of a training run: validate, set up the run folder, init
distributed, run the Trainer. `albef pretrain` and `albef finetune retrieval` both go through
`run_training`, so config errors, exit codes and the run-folder layout are the same everywhere.

Run folder: DIR/config.yaml (resolved config, git SHA in a comment), DIR/checkpoints/ (DeepSpeed
tags + `latest`), DIR/tensorboard/ (rank 0 event files).

Exit codes (pipeline/preemption.py): 0 finished, 75 preempted (checkpoint saved, requeue me),
2 bad configuration (nothing started), 1 any other failure (e.g. a non-finite loss).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, ConfigError, to_dict, to_yaml
from pipeline.distributed import DistInfo, dist_info_from_env, init_distributed
from pipeline.ds_config import build_ds_config, resolve_device
from pipeline.preemption import FAILED_EXIT_CODE
from pipeline.task import TrainTask

logger = logging.getLogger(__name__)

CONFIG_ERROR_EXIT_CODE = 2
# Keys the launchers add to the command line that are not config fields (`deepspeed` passes --local_rank).
LAUNCHER_KEYS = ("local_rank",)


def setup_logging(rank: int) -> None:
    """Rank-tagged log lines on stderr; ranks > 0 only warn, so the console is not doubled."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    path = run_dir / "config.yaml"
    tmp = path.with_name("config.yaml.tmp")
    tmp.write_text(f"# resolved config; git {git_sha()}\n" + to_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)


def run_training(
    cfg: Any,
    output_dir: str | Path,
    resume: str | None,
    make_task: Callable[[DistInfo, str], TrainTask],
    check: Callable[[Any, DistInfo, str], None] | None = None,
) -> int:
    """Validate `cfg` against the runtime, then train; returns the exit code.

    `cfg` has sections train/optim/deepspeed/logging (+ the task's own). `check(cfg, dist, device)`
    adds the task's runtime checks (raising ConfigError). Nothing is written and no process group
    is started before every check passed.
    """
    from pipeline.trainer import NonFiniteLossError, Trainer

    info = dist_info_from_env()
    setup_logging(info.rank)
    try:
        device = resolve_device(cfg.train.device)
        ds_config = build_ds_config(
            cfg.deepspeed.config, train=cfg.train, optim=cfg.optim, world_size=info.world_size, device=device
        )
        if check is not None:
            check(cfg, info, device)
    except ConfigError as err:
        logger.error("%s", err)
        return CONFIG_ERROR_EXIT_CODE
    run_dir = Path(output_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, run_dir)
    if device == "cpu" and cfg.train.cpu_threads is not None:
        import torch

        torch.set_num_threads(cfg.train.cpu_threads)
    init_distributed(info, device)
    trainer = Trainer(
        make_task(info, device),
        train=cfg.train,
        optim=cfg.optim,
        logging_cfg=cfg.logging,
        ds_config=ds_config,
        dist_info=info,
        device=device,
        run_dir=run_dir,
        resolved_config=to_dict(cfg),
    )
    try:
        return trainer.fit(resume)
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return FAILED_EXIT_CODE
