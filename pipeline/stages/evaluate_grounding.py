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

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.config import ALBEFConfig
from pipeline.config import ConfigError, check
from pipeline.retrieval.evaluate import eval_dtype
from pipeline.retrieval.report import report_stem
from pipeline.stages.evaluation import (
    exit_on_config_error,
    publish,
    read_eval_inputs,
    report_context,
    start_device,
)
from pipeline.tasks.grounding import GroundingEvalConfig, build_grounding_from_checkpoint, evaluate_grounding_model
from pipeline.tasks.ve import weights_summary

logger = logging.getLogger(__name__)


def _gradcam_block(cfg: GroundingEvalConfig, manifest: dict[str, Any], model_cfg: ALBEFConfig) -> int:
    block = cfg.gradcam_block(model_cfg)
    if cfg.mode == "itm":
        text = model_cfg.text
        check(text.fusion_layer <= block < text.num_layers, "block",
              f"itm Grad-CAM needs a fusion layer in [{text.fusion_layer}, {text.num_layers}), got {block}")  # fmt: skip
    else:
        check(block < model_cfg.vision.depth, "block", f"itc Grad-CAM needs a ViT block < {model_cfg.vision.depth}, got {block}")  # fmt: skip
    return block


def evaluate_grounding(
    checkpoint: str, data: str, output_dir: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `data`; returns the written report (every rank returns it).

    A bad option or a missing input is logged as one line naming the key and exits with code 2,
    before any model is built (pipeline/stages/evaluation.py).
    """
    inputs = read_eval_inputs(GroundingEvalConfig, checkpoint, data, overrides, _gradcam_block)
    cfg, info = inputs.cfg, inputs.info
    device = start_device(inputs)
    try:
        model, conversion = build_grounding_from_checkpoint(inputs.loaded.state_dict, inputs.model_cfg)
    except ValueError as err:
        exit_on_config_error(ConfigError("checkpoint", str(err)))
    model = model.to(device=device, dtype=eval_dtype(cfg.precision, device)).eval()
    dataset, split = inputs.dataset_and_split(data)
    stem = report_stem(dataset, split, "grounding")
    maps_dir = Path(output_dir) / "eval" / f"{stem}_maps" if cfg.write_maps else None
    result = evaluate_grounding_model(
        model, data, cfg, device, rank=info.rank, world_size=info.world_size, maps_dir=maps_dir
    )
    report = {
        **{k: v for k, v in result.items() if k != "timings"},
        **report_context(inputs, checkpoint, data, model, device),
        "maps": str(maps_dir) if maps_dir is not None else None,
        "weights": weights_summary(conversion),
        "timings": result["timings"],
    }
    scalars = {"accuracy": {"all": report["accuracy_all"], **report["accuracy"]}, "chance": report["chance"]}
    per_split = ", ".join(
        f"{k} {v:.2f} (chance {report['chance'][k]:.2f}, n={report['num_refs'][k]})"
        for k, v in report["accuracy"].items()
    )
    line = f"{stem}: grounding accuracy (IoU >= {cfg.iou_threshold}) {per_split}; all {report['accuracy_all']:.2f}"
    return publish(inputs, output_dir, stem, report, scalars, line)
