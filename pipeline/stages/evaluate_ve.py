"""`albef evaluate ve`: SNLI-VE accuracy of a checkpoint on an `albef prep snli_ve` split.

    albef evaluate ve --checkpoint runs/ve/checkpoints/best --data /data/shards/snli_ve_test \
        --output_dir runs/ve [--image_res=384 --precision=fp16 --pairs_per_batch=512 ...]

CKPT is a VE run folder (its latest checkpoint), a DeepSpeed tag folder, an exported file or an
official VE checkpoint (`checkpoint_best.pth` of VE.py; the key report is logged). Every hypothesis
of DATA is scored once (pipeline/tasks/ve.py); ranks split the shards and sum the counts.

Writes DIR/eval/ve_<dataset>_<split>.json (accuracy, per-class accuracy, confusion matrix, counts),
scalars `eval/ve_<dataset>_<split>/accuracy/{all,<label>}` under DIR/tensorboard, and prints a line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.retrieval.evaluate import eval_dtype
from pipeline.retrieval.report import report_stem
from pipeline.stages.evaluation import publish, read_eval_inputs, report_context, start_device
from pipeline.tasks.ve import VEEvalConfig, build_ve_from_checkpoint, evaluate_ve_model, weights_summary


def evaluate_ve(
    checkpoint: str, data: str, output_dir: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `data`; returns the written report (every rank returns it).

    A bad option or a missing input is logged as one line naming the key and exits with code 2,
    before any model is built (pipeline/stages/evaluation.py).
    """
    inputs = read_eval_inputs(VEEvalConfig, checkpoint, data, overrides)
    cfg, info = inputs.cfg, inputs.info
    device = start_device(inputs)
    model, conversion = build_ve_from_checkpoint(inputs.loaded.state_dict, inputs.model_cfg, distill=False)
    model = model.to(device=device, dtype=eval_dtype(cfg.precision, device)).eval()
    result = evaluate_ve_model(model, data, cfg, device, rank=info.rank, world_size=info.world_size)
    context = report_context(inputs, checkpoint, data, model, device)
    stem = report_stem(context["dataset"], context["split"], "ve")
    report = {
        **{k: v for k, v in result.items() if k != "timings"},
        "chance": 100.0 / len(result["labels"]),
        **context,
        "weights": weights_summary(conversion),
        "timings": result["timings"],
    }
    per_class = ", ".join(f"{k} {v:.2f}" for k, v in report["per_class"].items())
    line = (
        f"{stem}: accuracy {report['accuracy']:.2f}% on {report['num_pairs']} hypotheses of "
        f"{report['num_images']} images ({per_class}; chance {report['chance']:.2f})"
    )
    scalars = {"accuracy": {"all": report["accuracy"], **report["per_class"]}}
    return publish(inputs, output_dir, stem, report, scalars, line)
