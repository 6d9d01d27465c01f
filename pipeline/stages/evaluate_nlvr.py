"""`albef evaluate nlvr`: NLVR2 accuracy of a checkpoint on an `albef prep nlvr2` split (dev, test-P).

    albef evaluate nlvr --checkpoint runs/nlvr/checkpoints/best --data /data/shards/nlvr2_test \
        --output_dir runs/nlvr [--image_res=384 --precision=fp16 --pairs_per_batch=512 ...]

CKPT is an NLVR run folder (its latest checkpoint), a DeepSpeed tag folder, an exported file or an
official NLVR checkpoint (`checkpoint_best.pth` of NLVR.py, official key names; the key report is
logged and written). Every sentence of DATA is scored once (pipeline/tasks/nlvr.py); ranks split the
shards and sum the counts.

Writes DIR/eval/nlvr_<dataset>_<split>.json (accuracy, per-class accuracy, confusion matrix, counts,
the weights report), scalars `eval/nlvr_<dataset>_<split>/accuracy/{all,False,True}` under
DIR/tensorboard, and prints a line.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import ConfigError, check, load_config, resolve_path, to_dict
from pipeline.data import read_manifest
from pipeline.retrieval.evaluate import eval_dtype, infer_model_config
from pipeline.retrieval.report import tensorboard_scalars
from pipeline.runtime.distributed import dist_info_from_env, init_distributed
from pipeline.runtime.ds_config import resolve_device
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE
from pipeline.runtime.io import read_checkpoint, write_json_atomic
from pipeline.runtime.logs import setup_logging
from pipeline.tasks.nlvr import NLVREvalConfig, build_nlvr_from_checkpoint, evaluate_nlvr_model
from pipeline.tasks.ve import weights_summary

logger = logging.getLogger(__name__)


def report_stem(dataset: str, split: str | None) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}_{split or 'all'}")
    return f"nlvr_{safe}"


def evaluate_nlvr(
    checkpoint: str, data: str, output_dir: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `data`; returns the written report (every rank returns it).

    A bad option or a missing input is logged as one line naming the key and exits with code 2,
    before any model is built.
    """
    t_start = time.perf_counter()
    info = dist_info_from_env()
    setup_logging(info.rank)
    try:
        flat = {str(k).replace("-", "_").removeprefix("eval."): v for k, v in (overrides or {}).items()}
        flat.pop("local_rank", None)  # added by the `deepspeed` launcher
        cfg = load_config(NLVREvalConfig, None, flat)
        check(resolve_path(data) is not None, "data", f"eval data not found: {data}")
        check(Path(checkpoint).exists(), "checkpoint", f"not found: {checkpoint}")
        kind = resolve_device(cfg.device)
        eval_dtype(cfg.precision, torch.device(kind))  # fp16 on the CPU is refused here, before any work
        try:
            manifest = read_manifest(data)
        except (OSError, ValueError) as err:
            raise ConfigError("data", str(err)) from None
        check(
            manifest.get("sample_layout") == "pair", "data", f"{data} is not an `albef prep nlvr2` output (image pairs)"
        )
        try:
            loaded = read_checkpoint(checkpoint)
        except (OSError, ValueError) as err:
            raise ConfigError("checkpoint", str(err)) from None
        model_cfg = infer_model_config(loaded, cfg.preset, cfg.image_res)
    except ConfigError as err:
        logger.error("%s", err)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
    device = init_distributed(info, kind, timeout_s=3600.0, group_of_one=False)
    model, conversion = build_nlvr_from_checkpoint(loaded.state_dict, model_cfg, distill=False)
    model = model.to(device=device, dtype=eval_dtype(cfg.precision, device)).eval()
    result = evaluate_nlvr_model(model, data, cfg, device, rank=info.rank, world_size=info.world_size)
    dataset, split = cfg.dataset or str(manifest.get("source", Path(data).name)), manifest.get("split")
    stem = report_stem(dataset, split)
    report = {
        **{k: v for k, v in result.items() if k != "timings"},
        "chance": 100.0 / len(result["labels"]),
        "majority": 100.0 * max(sum(row) for row in result["confusion"]) / result["num_pairs"],
        "checkpoint": str(checkpoint),
        "checkpoint_step": loaded.step,
        "dataset": dataset,
        "split": split,
        "data": str(data),
        "weights": weights_summary(conversion),
        "config": to_dict(cfg),
        "model_config": model_cfg.to_dict(),
        "world_size": info.world_size,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "timings": result["timings"],
        "time_s": time.perf_counter() - t_start,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if info.rank == 0:
        out = Path(output_dir)
        write_json_atomic(out / "eval" / f"{stem}.json", report)
        scalars = {"accuracy": {"all": report["accuracy"], **report["per_class"]}}
        tensorboard_scalars(out / "tensorboard", f"eval/{stem}", scalars, loaded.step or 0)
        print(
            f"{stem}: accuracy {report['accuracy']:.2f}% on {report['num_pairs']} sentences "
            f"(chance {report['chance']:.2f}, majority class {report['majority']:.2f})"
        )
        logger.info("wrote %s (%.1f s)", out / "eval" / f"{stem}.json", report["time_s"])
    if info.world_size > 1:
        dist.barrier()
    return report
