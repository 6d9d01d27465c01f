"""`albef evaluate vqa`: answer every question of an `albef prep vqa` split with a VQA checkpoint.

    albef evaluate vqa --checkpoint runs/vqa/checkpoints/best --data /data/shards/vqa_test \
        --output_dir runs/vqa [--answer_list=answer_list.json --k_test=128 --precision=fp16 ...]

CKPT is a VQA run folder (its latest checkpoint), a DeepSpeed tag folder, an exported file or an
official VQA checkpoint (`checkpoint_*.pth` of VQA.py, {'model': state_dict}; the key report is
logged and saved; for its exact official outputs add --question_sep=false --first_token_twice=true,
the official tokenizer and ranking). The candidate answers are --answer_list, else
DATA/answer_list.json. Each question's k_test candidates of highest first-token probability are
re-ranked by their likelihood (pipeline/tasks/vqa.py); ranks split the shards and gather the answers.

Writes DIR/eval/vqa_<dataset>_<split>_results.json, the official result file [{question_id, answer}]
for the test server, and DIR/eval/vqa_<dataset>_<split>.json (VQA accuracy when the split has
answers, the majority-answer baseline, counts, weights report); scalars
`eval/vqa_<dataset>_<split>/accuracy/{all,majority}` under DIR/tensorboard; and prints a line.
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
from pipeline.data.text import build_tokenizer
from pipeline.retrieval.evaluate import eval_dtype, infer_model_config
from pipeline.retrieval.report import tensorboard_scalars
from pipeline.runtime.distributed import dist_info_from_env, init_distributed
from pipeline.runtime.ds_config import resolve_device
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE
from pipeline.runtime.io import read_checkpoint, write_json_atomic
from pipeline.runtime.logs import setup_logging
from pipeline.tasks.ve import weights_summary
from pipeline.tasks.vqa import (
    VQAEvalConfig,
    build_vqa_from_checkpoint,
    evaluate_vqa_model,
    read_answer_list,
    resolve_answer_list,
)

logger = logging.getLogger(__name__)


def report_stem(dataset: str, split: str | None) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}_{split or 'all'}")
    return f"vqa_{safe}"


def evaluate_vqa(
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
        cfg = load_config(VQAEvalConfig, None, flat)
        check(resolve_path(data) is not None, "data", f"eval data not found: {data}")
        check(Path(checkpoint).exists(), "checkpoint", f"not found: {checkpoint}")
        answers_path = resolve_answer_list(cfg.answer_list, data)
        check(answers_path is not None, "answer_list", f"not given and {data} has no answer_list.json")
        try:
            answer_list = read_answer_list(answers_path)  # type: ignore[arg-type]
        except (OSError, ValueError) as err:
            raise ConfigError("answer_list", str(err)) from None
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
    except ConfigError as err:
        logger.error("%s", err)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
    device = init_distributed(info, kind, timeout_s=3600.0, group_of_one=False)
    model, conversion = build_vqa_from_checkpoint(
        loaded.state_dict, model_cfg, distill=False, first_token_twice=cfg.first_token_twice
    )
    model = model.to(device=device, dtype=eval_dtype(cfg.precision, device)).eval()
    result = evaluate_vqa_model(
        model, data, answer_list, cfg, device, tokenizer=build_tokenizer(cfg.vocab), rank=info.rank,
        world_size=info.world_size,
    )  # fmt: skip
    dataset, split = cfg.dataset or str(manifest.get("source", Path(data).name)), manifest.get("split")
    stem = report_stem(dataset, split)
    out = Path(output_dir)
    report = {
        **{k: v for k, v in result.items() if k not in ("results", "timings")},
        "results_file": str(out / "eval" / f"{stem}_results.json"),
        "answer_list": str(answers_path),
        "num_candidates": len(answer_list),
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
        write_json_atomic(out / "eval" / f"{stem}_results.json", result["results"])
        write_json_atomic(out / "eval" / f"{stem}.json", report)
        line = f"{stem}: answered {report['num_questions']} questions of {report['num_images']} images"
        if report["accuracy"] is not None:
            scalars = {"accuracy": {"all": report["accuracy"], "majority": report["majority_accuracy"]}}
            tensorboard_scalars(out / "tensorboard", f"eval/{stem}", scalars, loaded.step or 0)
            line += (
                f"; VQA accuracy {report['accuracy']:.2f}% (majority answer "
                f"{report['majority_answer']!r}: {report['majority_accuracy']:.2f}%)"
            )
        print(line + f"; results in {report['results_file']}")
        logger.info("wrote %s (%.1f s)", out / "eval" / f"{stem}.json", report["time_s"])
    if info.world_size > 1:
        dist.barrier()
    return report
