"""`albef finetune grounding`: weakly supervised RefCOCO+ grounding, fine-tuned as the official
Grounding.py does: the retrieval model and losses (ITC with image-id positives + ITM) on the
image-expression pairs of the train split, no box supervision.

    albef finetune grounding --config grounding_refcoco --checkpoint runs/4m --output_dir runs/grounding \
        [--resume auto|none|PATH] [--data.train=[/data/refcoco+_train] --data.val=/data/refcoco+_val ...]

CKPT is anything `albef finetune retrieval` starts from (a pretraining run of ours, an exported file,
an official ALBEF_4M.pth) or an official grounding checkpoint. The training is `RetrievalTask`
(pipeline/stages/finetune_retrieval.py) unchanged; `GroundingTask` only replaces the per-epoch
validation: grounding accuracy on `data.val` (an `albef prep refcoco+ --split val` folder, the
official `val_d`), which selects the `best` tag as the official code keeps `checkpoint_best.pth`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pipeline.config import ConfigError, TrainingStageConfig, check, load_config
from pipeline.data import read_manifest
from pipeline.runtime.distributed import DistInfo
from pipeline.stages.finetune_retrieval import (
    RetrievalDataConfig,
    RetrievalModelConfig,
    RetrievalOptimConfig,
    RetrievalTask,
    RetrievalTrainConfig,
    check_runtime,
)
from pipeline.tasks.grounding import GroundingEvalConfig, evaluate_grounding_model
from pipeline.train.launch import config_error_exit, run_training, strip_launcher_keys
from pipeline.train.task import StepContext


@dataclass
class GroundingDataConfig(RetrievalDataConfig):
    """`albef prep refcoco+ --split train` folders (DataConfig) + the `--split val` folder validated per epoch."""

    max_tokens: int = 30  # tokenizer max length (Grounding.py train: max_length=30)


@dataclass
class GroundingConfig(TrainingStageConfig):
    """`albef finetune grounding`: the retrieval fine-tuning sections (official Grounding.yaml equals
    Retrieval_coco.yaml's values: 384 px, batch 32, 5 epochs, lr 1e-5 -> 1e-6 per-epoch cosine,
    alpha 0.4 ramped over epoch 1, queue 65536) + the grounding evaluation."""

    model: RetrievalModelConfig = field(default_factory=RetrievalModelConfig)
    data: GroundingDataConfig = field(default_factory=GroundingDataConfig)
    train: RetrievalTrainConfig = field(default_factory=RetrievalTrainConfig)
    optim: RetrievalOptimConfig = field(default_factory=RetrievalOptimConfig)
    eval: GroundingEvalConfig = field(default_factory=GroundingEvalConfig)


class GroundingTask(RetrievalTask):
    """Retrieval fine-tuning validated by grounding accuracy (Grad-CAM proposal ranking)."""

    name = "finetune_grounding"
    best_metric = "accuracy"

    def __init__(self, cfg: GroundingConfig, checkpoint: str) -> None:
        # RetrievalTask reads model/data/train/optim, which GroundingConfig shares; `eval` is read only
        # by `validate`, replaced here.
        super().__init__(cfg, checkpoint)  # type: ignore[arg-type]
        self.grounding_cfg = cfg

    def validate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Grounding accuracy on `data.val` (collective): `accuracy` (all refs) and `accuracy_<split>`."""
        if self.cfg.data.val is None:
            return {}
        result = evaluate_grounding_model(
            model,  # type: ignore[arg-type]
            self.cfg.data.val,
            self.grounding_cfg.eval,
            ctx.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
            tokenizer=self.tokenizer,
        )
        return {"accuracy": result["accuracy_all"], **{f"accuracy_{k}": v for k, v in result["accuracy"].items()}}

    def export_extra(self) -> dict[str, Any]:
        return {**super().export_extra(), "task": "grounding"}


def check_grounding_runtime(task: GroundingTask) -> Callable[[GroundingConfig, DistInfo, str], None]:
    """The retrieval stage's checks, and `data.val` must hold evaluation samples (a val/test prep with
    boxes and proposals): a train prep there would fail only at the end of the first epoch."""
    base = check_runtime(task)

    def _check(cfg: GroundingConfig, info: DistInfo, device: str) -> None:
        base(cfg, info, device)  # type: ignore[arg-type]
        if cfg.data.val is not None:
            manifest = read_manifest(cfg.data.val)
            source, split = manifest.get("source"), manifest.get("split")
            check(source == "refcoco+" and split in ("val", "test"), "data.val",
                  f"{cfg.data.val} is a {source} {split} prep; expected `albef prep refcoco+ --split val|test`")  # fmt: skip

    return _check


def finetune_grounding(
    config: str, checkpoint: str, output_dir: str, resume: str = "auto", overrides: dict[str, Any] | None = None
) -> int:
    """Run grounding fine-tuning; returns the exit code (0 / 75 preempted / 2 bad config / 1 failure)."""
    try:
        cfg = load_config(GroundingConfig, config, strip_launcher_keys(overrides))
    except ConfigError as err:
        return config_error_exit(err)
    task = GroundingTask(cfg, checkpoint)
    return run_training(cfg, output_dir, resume, make_task=lambda info: task, check=check_grounding_runtime(task))
