"""`albef evaluate retrieval`: recall@K of a checkpoint on an eval split, with batched ITM re-ranking.

    albef evaluate retrieval --checkpoint runs/coco --data /data/shards/coco_test --output_dir runs/coco \
        [--k_test 256] [--image_res=384 --precision=fp16 --pairs_per_batch=2048 ...]

CKPT is a run folder (its latest checkpoint), a DeepSpeed tag folder, an exported file or an
official ALBEF .pth (pretraining or fine-tuned layout): evaluating a pretraining checkpoint is the
zero-shot evaluation. DATA is an `albef prep ... --split test` output folder. The evaluation itself
is pipeline/retrieval/evaluate.py.

Writes DIR/eval/retrieval_<dataset>_<split>.{json,png}, scalars under DIR/tensorboard, and prints a
table.
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

from pipeline.config import ConfigError, check, resolve_path, to_dict
from pipeline.data import read_manifest
from pipeline.retrieval.evaluate import (
    build_eval_model,
    eval_dtype,
    evaluate_model,
    load_eval_config,
    read_eval_checkpoint,
)
from pipeline.retrieval.report import format_rerank, format_table, plot_recall, report_stem, tensorboard_scalars
from pipeline.retrieval.rerank import SCORE_NAMES
from pipeline.runtime.distributed import dist_info_from_env, init_distributed
from pipeline.runtime.ds_config import resolve_device
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE
from pipeline.runtime.io import torch_save_atomic, write_json_atomic
from pipeline.runtime.logs import setup_logging
from pipeline.stages.checks import check_retrieval_weights

logger = logging.getLogger(__name__)


def _save_scores(path: Path, scores: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    torch_save_atomic(
        path, {f"{name}_{side}": m for name, pair in scores.items() for side, m in zip(("i2t", "t2i"), pair)}
    )


def evaluate_retrieval(
    checkpoint: str, data: str, output_dir: str, k_test: int | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `data`; returns the written report (every rank returns it).

    A bad option or a missing input is logged as one line naming the key and exits with code 2
    (as the training stages), before any model is built.
    """
    t_start = time.perf_counter()
    info = dist_info_from_env()
    setup_logging(info.rank)
    try:
        cfg = load_eval_config(k_test, overrides)
        check(resolve_path(data) is not None, "data", f"eval data not found: {data}")
        check(Path(checkpoint).exists(), "checkpoint", f"not found: {checkpoint}")
        kind = resolve_device(cfg.device)
        eval_dtype(cfg.precision, torch.device(kind))  # fp16 on the CPU is refused here, before any work
        try:
            manifest = read_manifest(data)
        except (OSError, ValueError) as err:
            raise ConfigError("data", str(err)) from None
        loaded, model_cfg = read_eval_checkpoint(checkpoint, cfg)
        check_retrieval_weights(loaded, model_cfg)
    except ConfigError as err:
        logger.error("%s", err)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
    device = init_distributed(info, kind, timeout_s=3600.0, group_of_one=False)
    rank, world = info.rank, info.world_size
    model = build_eval_model(loaded, model_cfg, cfg, device)
    result = evaluate_model(model, data, cfg, device, rank=rank, world_size=world)
    dataset, split = cfg.dataset or str(manifest.get("source", Path(data).name)), manifest.get("split")
    stem = report_stem(dataset, split)
    report = {
        "metrics": {s: result["metrics"][s] for s in SCORE_NAMES},
        "chance": result["metrics"]["chance"],
        "rerank_vs_itc": result["rerank_vs_itc"],
        "recall_curves": {
            s: {side: {str(k): v for k, v in c.items()} for side, c in curve.items()}
            for s, curve in result["curves"].items()
        },
        "k_test": cfg.k_test,
        "checkpoint": str(checkpoint),
        "checkpoint_step": loaded.step,
        "dataset": dataset,
        "split": split,
        "data": str(data),
        "num_images": result["num_images"],
        "num_texts": result["num_texts"],
        "bad_samples": result["bad_samples"],
        "config": to_dict(cfg),
        "model_config": model.config.to_dict(),
        "world_size": world,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "timings": result["timings"],
        "time_s": time.perf_counter() - t_start,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if rank == 0:
        out = Path(output_dir)
        write_json_atomic(out / "eval" / f"{stem}.json", report)
        tensorboard_scalars(out / "tensorboard", f"eval/{stem}", report["metrics"], loaded.step or 0)
        plot_recall(out / "eval" / f"{stem}.png", result["curves"], f"{dataset} {split or ''}: {checkpoint}")
        if cfg.save_scores:
            _save_scores(out / "eval" / f"{stem}_scores.pt", result["scores"])
        print(
            format_table(
                {**report["metrics"], "chance": report["chance"]},
                f"{stem}: {report['num_images']} images x {report['num_texts']} captions, k_test {cfg.k_test}",
            )
        )
        print(format_rerank(report["rerank_vs_itc"]))
        logger.info("wrote %s (%.1f s)", out / "eval" / f"{stem}.json", report["time_s"])
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()  # a clean exit for every rank (srun --kill-on-bad-exit)
    return report
