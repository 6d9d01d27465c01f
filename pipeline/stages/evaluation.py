"""What every `albef evaluate <task>` stage does around its task's evaluation core.

One order for all tasks, so they fail and report alike: read the options, the data manifest and the
checkpoint (weights-only) and run the task's own checks before any model is built, a bad one being
one logged line naming the key and exit code 2; then the task builds its model and scores the split;
rank 0 writes DIR/eval/<task>_<dataset>_<split>.json (atomic), TensorBoard scalars under
DIR/tensorboard and one printed line, and every rank returns the same report.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.config import ALBEFConfig
from pipeline.config import ConfigError, check, load_config, resolve_path, to_dict
from pipeline.data import read_manifest
from pipeline.retrieval.evaluate import eval_dtype, infer_model_config
from pipeline.retrieval.report import tensorboard_scalars
from pipeline.runtime.distributed import DistInfo, dist_info_from_env, init_distributed
from pipeline.runtime.ds_config import resolve_device
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE
from pipeline.runtime.io import LoadedCheckpoint, read_checkpoint, write_json_atomic
from pipeline.runtime.logs import setup_logging

logger = logging.getLogger(__name__)


@dataclass
class EvalInputs:
    """Everything an evaluation stage has checked before building a model."""

    info: DistInfo
    cfg: Any  # the task's eval config dataclass
    device_kind: str
    manifest: dict[str, Any]
    loaded: LoadedCheckpoint
    model_cfg: ALBEFConfig
    extra: Any  # what the task's own checks returned (e.g. VQA's answer list)
    t_start: float

    def dataset_and_split(self, data: str) -> tuple[str, str | None]:
        dataset = self.cfg.dataset or str(self.manifest.get("source", Path(data).name))
        return dataset, self.manifest.get("split")


def exit_on_config_error(err: ConfigError) -> None:
    logger.error("%s", err)
    raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None


def read_eval_inputs(
    config_cls: type,
    checkpoint: str,
    data: str,
    overrides: Mapping[str, Any] | None,
    task_checks: Callable[[Any, dict[str, Any], ALBEFConfig], Any] | None = None,
) -> EvalInputs:
    """Options, manifest, checkpoint and the task's checks (`task_checks(cfg, manifest, model_cfg)`,
    raising ConfigError); any ConfigError exits 2 here, before a model or a process group exists."""
    t_start = time.perf_counter()
    info = dist_info_from_env()
    setup_logging(info.rank)
    try:
        flat = {str(k).replace("-", "_").removeprefix("eval."): v for k, v in (overrides or {}).items()}
        flat.pop("local_rank", None)  # added by the `deepspeed` launcher
        cfg: Any = load_config(config_cls, None, flat)
        check(resolve_path(data) is not None, "data", f"eval data not found: {data}")
        check(Path(checkpoint).exists(), "checkpoint", f"not found: {checkpoint}")
        kind = resolve_device(cfg.device)
        eval_dtype(cfg.precision, torch.device(kind))  # fp16 on the CPU is refused here, before any work
        try:
            manifest = read_manifest(data)
        except (OSError, ValueError) as err:
            raise ConfigError("data", str(err)) from None
        try:
            loaded = read_checkpoint(checkpoint)
        except (OSError, ValueError) as err:
            raise ConfigError("checkpoint", str(err)) from None
        model_cfg = infer_model_config(loaded, cfg.preset, cfg.image_res)
        extra = task_checks(cfg, manifest, model_cfg) if task_checks is not None else None
    except ConfigError as err:
        exit_on_config_error(err)
        raise  # unreachable: keeps type checkers sure the names below are bound
    return EvalInputs(info, cfg, kind, manifest, loaded, model_cfg, extra, t_start)


def start_device(inputs: EvalInputs) -> torch.device:
    """The process group (all ranks of the launch) and this rank's device."""
    return init_distributed(inputs.info, inputs.device_kind, timeout_s=3600.0, group_of_one=False)


def report_context(
    inputs: EvalInputs, checkpoint: str, data: str, model: torch.nn.Module, device: torch.device
) -> dict[str, Any]:
    """The fields every evaluation report carries besides the task's own results."""
    dataset, split = inputs.dataset_and_split(data)
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_step": inputs.loaded.step,
        "dataset": dataset,
        "split": split,
        "data": str(data),
        "config": to_dict(inputs.cfg),
        "model_config": inputs.model_cfg.to_dict(),
        "world_size": inputs.info.world_size,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def publish(
    inputs: EvalInputs,
    output_dir: str,
    stem: str,
    report: dict[str, Any],
    scalars: Mapping[str, Any],
    line: str,
) -> dict[str, Any]:
    """Rank 0 writes the report JSON, the TensorBoard scalars (if any) and prints `line`; all ranks wait."""
    report["time_s"] = time.perf_counter() - inputs.t_start
    report["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if inputs.info.rank == 0:
        out = Path(output_dir)
        write_json_atomic(out / "eval" / f"{stem}.json", report)
        if scalars:
            tensorboard_scalars(out / "tensorboard", f"eval/{stem}", scalars, inputs.loaded.step or 0)
        print(line)
        logger.info("wrote %s (%.1f s)", out / "eval" / f"{stem}.json", report["time_s"])
    if inputs.info.world_size > 1:
        dist.barrier()
    return report
