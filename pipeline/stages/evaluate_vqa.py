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

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.config import ALBEFConfig
from pipeline.config import ConfigError
from pipeline.data.text import build_tokenizer
from pipeline.retrieval.evaluate import eval_dtype
from pipeline.retrieval.report import report_stem
from pipeline.runtime.io import write_json_atomic
from pipeline.stages.evaluation import publish, read_eval_inputs, report_context, start_device
from pipeline.tasks.ve import weights_summary
from pipeline.tasks.vqa import (
    VQAEvalConfig,
    build_vqa_from_checkpoint,
    evaluate_vqa_model,
    read_answer_list,
    resolve_answer_list,
)


def evaluate_vqa(
    checkpoint: str, data: str, output_dir: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `data`; returns the written report (every rank returns it).

    A bad option or a missing input is logged as one line naming the key and exits with code 2,
    before any model is built (pipeline/stages/evaluation.py).
    """

    def answer_list_of(cfg: VQAEvalConfig, manifest: dict[str, Any], model_cfg: ALBEFConfig) -> tuple[Path, list[str]]:
        path = resolve_answer_list(cfg.answer_list, data)
        if path is None:
            raise ConfigError("answer_list", f"not given and {data} has no answer_list.json")
        try:
            return path, read_answer_list(path)
        except (OSError, ValueError) as err:
            raise ConfigError("answer_list", str(err)) from None

    inputs = read_eval_inputs(VQAEvalConfig, checkpoint, data, overrides, answer_list_of)
    cfg, info = inputs.cfg, inputs.info
    answers_path, answer_list = inputs.extra
    device = start_device(inputs)
    model, conversion = build_vqa_from_checkpoint(
        inputs.loaded.state_dict, inputs.model_cfg, distill=False, first_token_twice=cfg.first_token_twice
    )
    model = model.to(device=device, dtype=eval_dtype(cfg.precision, device)).eval()
    result = evaluate_vqa_model(
        model, data, answer_list, cfg, device, tokenizer=build_tokenizer(cfg.vocab), rank=info.rank,
        world_size=info.world_size,
    )  # fmt: skip
    context = report_context(inputs, checkpoint, data, model, device)
    stem = report_stem(context["dataset"], context["split"], "vqa")
    results_file = Path(output_dir) / "eval" / f"{stem}_results.json"
    report = {
        **{k: v for k, v in result.items() if k not in ("results", "timings")},
        "results_file": str(results_file),
        "answer_list": str(answers_path),
        "num_candidates": len(answer_list),
        **context,
        "weights": weights_summary(conversion),
        "timings": result["timings"],
    }
    line = f"{stem}: answered {report['num_questions']} questions of {report['num_images']} images"
    scalars = {}
    if report["accuracy"] is not None:
        scalars = {"accuracy": {"all": report["accuracy"], "majority": report["majority_accuracy"]}}
        line += (
            f"; VQA accuracy {report['accuracy']:.2f}% (majority answer "
            f"{report['majority_answer']!r}: {report['majority_accuracy']:.2f}%)"
        )
    if info.rank == 0:
        write_json_atomic(results_file, result["results"])  # the official test-server file
    return publish(inputs, output_dir, stem, report, scalars, line + f"; results in {results_file}")
