"""`albef finetune retrieval`: ITC + ITM fine-tuning with image-id queues, run by the shared Trainer.

    albef finetune retrieval --config retrieval_coco --checkpoint runs/4m --output_dir runs/coco \
        [--resume auto|none|PATH] [--data.train=[/data/coco_train] --data.val=/data/coco_val ...]

CKPT (the initialisation) is anything `albef evaluate retrieval` reads: a pretraining run folder of
ours, an exported file, or an official ALBEF_4M.pth; position embeddings are resampled to
`model.image_res` (384 in the paper). `--resume` continues THIS run (DeepSpeed checkpoints in
DIR/checkpoints), in which case the initial checkpoint only fixes the architecture.

What differs from pretraining lives in `RetrievalTask` (an AlbefTask, pipeline/train/albef_task.py):
the model (model/retrieval.py), the batch -> model inputs with the image ids, the epoch size and
the per-epoch validation (pipeline/retrieval/evaluate.py on `data.val`), whose r_mean of
`eval.score_for_best` selects the `best` checkpoint tag. The loop, DeepSpeed, the queue update,
resume, preemption and TensorBoard are the pretraining ones.

Epoch size: the official fine-tuning visits every (image, caption) pair once per epoch; our loader
yields an image with one of its captions drawn at random, so an epoch is sized to the number of
captions of the manifests (data.samples_per_epoch overrides it) and the step counts match the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from model.retrieval import build_retrieval, load_retrieval_state
from pipeline.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TrainingStageConfig,
    check,
    load_config,
)
from pipeline.data import check_prep_folders
from pipeline.retrieval.evaluate import EvalConfig, evaluate_model
from pipeline.runtime.distributed import DistInfo
from pipeline.runtime.io import LoadedCheckpoint, read_checkpoint
from pipeline.stages.checks import check_retrieval_weights
from pipeline.train.albef_task import AlbefTask, batch_tensors
from pipeline.train.launch import config_error_exit, run_training, strip_launcher_keys
from pipeline.train.task import StepContext


@dataclass
class RetrievalModelConfig(ModelConfig):
    """ModelConfig with the fine-tuning resolution as default."""

    image_res: int = 384  # px (paper: 384 for fine-tuning; pos-embed resampled from the checkpoint's)


@dataclass
class RetrievalDataConfig(DataConfig):
    """Training shards (DataConfig) plus the validation split evaluated at every epoch end."""

    max_tokens: int = 30  # tokenizer max length (official retrieval: 30)
    val: str | None = None  # `albef prep ... --split val` folder; None = no validation (no `best` tag)


@dataclass
class RetrievalTrainConfig(TrainConfig):
    """TrainConfig with the paper's fine-tuning defaults."""

    batch_size: int = 32  # images per GPU per micro-step
    epochs: int = 5  # COCO 5, Flickr30k 10


@dataclass
class RetrievalOptimConfig(OptimConfig):
    """AdamW, lr 1e-5 cosine to 1e-6 stepped per epoch, no warm-up (the official warm-up LR equals the LR)."""

    schedule: Literal["cosine", "per_epoch_cosine"] = "per_epoch_cosine"  # official Retrieval.py (see OptimConfig)
    lr: float = 1e-5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 0


@dataclass
class RetrievalConfig(TrainingStageConfig):
    """`albef finetune retrieval`: the shared sections with fine-tuning defaults + the evaluation."""

    model: RetrievalModelConfig = field(default_factory=RetrievalModelConfig)
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    train: RetrievalTrainConfig = field(default_factory=RetrievalTrainConfig)
    optim: RetrievalOptimConfig = field(default_factory=RetrievalOptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class RetrievalTask(AlbefTask):
    """Retrieval fine-tuning: ITC with image-id positives + ITM, validated by retrieval recall."""

    name = "finetune_retrieval"
    best_metric = "r_mean"
    finetune = True
    # The official fine-tuning visits every (image, caption) pair once per epoch; our loader yields an
    # image with one caption drawn at random, so an epoch is sized in captions and step counts match.
    epoch_counts = "captions"

    def __init__(self, cfg: RetrievalConfig, checkpoint: str) -> None:
        super().__init__(cfg)
        self.checkpoint = checkpoint
        self._loaded: LoadedCheckpoint | None = None

    def initial_weights(self) -> LoadedCheckpoint:
        """The checkpoint to start from, read once (weights-only)."""
        if self._loaded is None:
            self._loaded = read_checkpoint(self.checkpoint)
        return self._loaded

    def build_model(self) -> nn.Module:
        model = build_retrieval(self.model_config())
        load_retrieval_state(model, self.initial_weights().state_dict)  # logs what it mapped/skipped
        return model

    def export_extra(self) -> dict[str, Any]:
        return {**super().export_extra(), "initial_checkpoint": str(self.checkpoint)}  # for the model card

    def model_inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = batch_tensors(batch, device, ("image", "input_ids", "attention_mask"))
        inputs["idx"] = batch["image_idx"].to(device, non_blocking=True)  # stable id of (source, image_id)
        return inputs

    def validate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Retrieval on `data.val` (collective); `r_mean` = that of eval.score_for_best."""
        if self.cfg.data.val is None:
            return {}
        result = evaluate_model(
            model,
            self.cfg.data.val,
            self.cfg.eval,
            ctx.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
            tokenizer=self.tokenizer,
        )
        flat = {
            f"{score}/{key}": value
            for score, values in result["metrics"].items()
            if score != "chance"
            for key, value in values.items()
        }
        flat["r_mean"] = result["metrics"][self.cfg.eval.score_for_best]["r_mean"]
        return flat


def check_runtime(task: RetrievalTask) -> Callable[[RetrievalConfig, DistInfo, str], None]:
    """The stage's checks that need the file system (ConfigError naming the key), the initial
    checkpoint included: it is read here (weights-only) and kept for `build_model`, so a file that
    cannot be read fails before the run folder is written."""

    def _check(cfg: RetrievalConfig, info: DistInfo, device: str) -> None:
        check(Path(task.checkpoint).exists(), "checkpoint", f"not found: {task.checkpoint}")
        folders = [(f"data.train[{i}]", f) for i, f in enumerate(cfg.data.train)]
        check_prep_folders(folders + ([("data.val", cfg.data.val)] if cfg.data.val is not None else []))
        try:
            loaded = task.initial_weights()
        except (OSError, ValueError) as err:
            raise ConfigError("checkpoint", str(err)) from None
        check_retrieval_weights(loaded, task.model_config())

    return _check


def finetune_retrieval(
    config: str, checkpoint: str, output_dir: str, resume: str = "auto", overrides: dict[str, Any] | None = None
) -> int:
    """Run retrieval fine-tuning; returns the exit code (0 / 75 preempted / 2 bad config / 1 failure)."""
    try:
        cfg = load_config(RetrievalConfig, config, strip_launcher_keys(overrides))
    except ConfigError as err:
        return config_error_exit(err)
    task = RetrievalTask(cfg, checkpoint)
    return run_training(cfg, output_dir, resume, make_task=lambda info: task, check=check_runtime(task))
