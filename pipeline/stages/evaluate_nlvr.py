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

from collections.abc import Mapping
from typing import Any

from model.config import ALBEFConfig
from pipeline.config import check
from pipeline.retrieval.evaluate import eval_dtype
from pipeline.retrieval.report import report_stem
from pipeline.stages.evaluation import publish, read_eval_inputs, report_context, start_device
from pipeline.tasks.nlvr import NLVREvalConfig, build_nlvr_from_checkpoint, evaluate_nlvr_model
from pipeline.tasks.ve import weights_summary


def evaluate_nlvr(
    checkpoint: str, data: str, output_dir: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `data`; returns the written report (every rank returns it).

    A bad option or a missing input is logged as one line naming the key and exits with code 2,
    before any model is built (pipeline/stages/evaluation.py).
    """

    def is_pair_data(cfg: NLVREvalConfig, manifest: dict[str, Any], model_cfg: ALBEFConfig) -> None:
        layout = manifest.get("sample_layout")
        check(layout == "pair", "data", f"{data} is not an `albef prep nlvr2` output (image pairs)")

    inputs = read_eval_inputs(NLVREvalConfig, checkpoint, data, overrides, is_pair_data)
    cfg, info = inputs.cfg, inputs.info
    device = start_device(inputs)
    model, conversion = build_nlvr_from_checkpoint(inputs.loaded.state_dict, inputs.model_cfg, distill=False)
    model = model.to(device=device, dtype=eval_dtype(cfg.precision, device)).eval()
    result = evaluate_nlvr_model(model, data, cfg, device, rank=info.rank, world_size=info.world_size)
    context = report_context(inputs, checkpoint, data, model, device)
    stem = report_stem(context["dataset"], context["split"], "nlvr")
    report = {
        **{k: v for k, v in result.items() if k != "timings"},
        "chance": 100.0 / len(result["labels"]),
        "majority": 100.0 * max(sum(row) for row in result["confusion"]) / result["num_pairs"],
        **context,
        "weights": weights_summary(conversion),
        "timings": result["timings"],
    }
    line = (
        f"{stem}: accuracy {report['accuracy']:.2f}% on {report['num_pairs']} sentences "
        f"(chance {report['chance']:.2f}, majority class {report['majority']:.2f})"
    )
    scalars = {"accuracy": {"all": report["accuracy"], **report["per_class"]}}
    return publish(inputs, output_dir, stem, report, scalars, line)
