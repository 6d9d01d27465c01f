"""`albef evaluate grounding`: RefCOCO+ weakly supervised grounding accuracy of a checkpoint.

    albef evaluate grounding --checkpoint runs/grounding/checkpoints/best --data /data/shards/refcoco+_test \
        --output_dir runs/grounding [--mode=itm|itc --block=8 --write_maps=20 --precision=fp32 ...]

CKPT is a grounding (or retrieval) run folder (its latest checkpoint), a DeepSpeed tag folder, an
exported file or an official checkpoint ({'model': state_dict}, official key names: the
`checkpoint_best.pth` of Grounding.py; the key report is logged and written). DATA is an
`albef prep refcoco+ --split val|test` folder. Per expression: Grad-CAM (itm: the cross-attention of
the official block, the 3rd fusion layer), proposals ranked as the official `grounding_eval`, a hit
when the chosen box has IoU >= 0.5 with the GT (pipeline/tasks/grounding.py).

Writes DIR/eval/grounding_<dataset>_<split>.json (accuracy per split val/testA/testB and over all,
the random-proposal chance and the proposals' upper bound per split, counts), scalars
`eval/grounding_<dataset>_<split>/accuracy/<split>` under DIR/tensorboard, with --write_maps N the first
N maps as DIR/eval/grounding_<dataset>_<split>_maps/ref<id>_<split>_<hit|miss>.png, and prints a line.
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
from pipeline.tasks.grounding import GroundingEvalConfig, build_grounding_from_checkpoint, evaluate_grounding_model
from pipeline.tasks.ve import weights_summary

logger = logging.getLogger(__name__)


def report_stem(dataset: str, split: str | None) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}_{split or 'all'}")
    return f"grounding_{safe}"


def evaluate_grounding(
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
        cfg = load_config(GroundingEvalConfig, None, flat)
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
        block = cfg.gradcam_block(model_cfg)
        if cfg.mode == "itm":
            text = model_cfg.text
            check(text.fusion_layer <= block < text.num_layers, "block",
                  f"itm Grad-CAM needs a fusion layer in [{text.fusion_layer}, {text.num_layers}), got {block}")  # fmt: skip
        else:
            check(block < model_cfg.vision.depth, "block", f"itc Grad-CAM needs a ViT block < {model_cfg.vision.depth}, got {block}")  # fmt: skip
    except ConfigError as err:
        logger.error("%s", err)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
    device = init_distributed(info, kind, timeout_s=3600.0, group_of_one=False)
    try:
        model, conversion = build_grounding_from_checkpoint(loaded.state_dict, model_cfg)
    except ValueError as err:
        logger.error("checkpoint: %s", err)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
    model = model.to(device=device, dtype=eval_dtype(cfg.precision, device)).eval()
    dataset, split = cfg.dataset or str(manifest.get("source", Path(data).name)), manifest.get("split")
    stem = report_stem(dataset, split)
    out = Path(output_dir)
    maps_dir = out / "eval" / f"{stem}_maps" if cfg.write_maps else None
    result = evaluate_grounding_model(
        model, data, cfg, device, rank=info.rank, world_size=info.world_size, maps_dir=maps_dir
    )
    report = {
        **{k: v for k, v in result.items() if k != "timings"},
        "checkpoint": str(checkpoint),
        "checkpoint_step": loaded.step,
        "dataset": dataset,
        "split": split,
        "data": str(data),
        "maps": str(maps_dir) if maps_dir is not None else None,
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
        write_json_atomic(out / "eval" / f"{stem}.json", report)
        scalars = {"accuracy": {"all": report["accuracy_all"], **report["accuracy"]}, "chance": report["chance"]}
        tensorboard_scalars(out / "tensorboard", f"eval/{stem}", scalars, loaded.step or 0)
        per_split = ", ".join(
            f"{k} {v:.2f} (chance {report['chance'][k]:.2f}, n={report['num_refs'][k]})"
            for k, v in report["accuracy"].items()
        )
        print(f"{stem}: grounding accuracy (IoU >= {cfg.iou_threshold}) {per_split}; all {report['accuracy_all']:.2f}")
        logger.info("wrote %s (%.1f s)", out / "eval" / f"{stem}.json", report["time_s"])
    if info.world_size > 1:
        dist.barrier()
    return report
