"""`albef finetune ve`: SNLI-VE fine-tuning (3-way classifier on the fused [CLS], with distillation).

    albef finetune ve --config ve_snli --checkpoint runs/4m --output_dir runs/ve \
        [--resume auto|none|PATH] [--data.train=[/data/snli_ve_train] --data.val=/data/snli_ve_dev ...]

CKPT (the initialisation) is a pretraining run folder of ours, an exported file, an official
ALBEF_4M.pth / ALBEF.pth (the official VE.py key loop is applied) or an official/our VE checkpoint;
position embeddings are resampled to `model.image_res` (384 in the paper). The classifier head
starts from its random init; the momentum teacher is copied from the loaded weights when the
checkpoint has none. `--resume` continues THIS run, the initial checkpoint then only fixes the
architecture.

What differs from retrieval fine-tuning lives in `VETask` (an AlbefTask): the model
(model/heads/ve.py), the batch -> model inputs with the label of the drawn hypothesis, no queue, an
epoch = one pass over the hypotheses (as the official loop over (image, hypothesis) pairs) and the
per-epoch validation accuracy on `data.val` (pipeline/tasks/ve.py), which selects the `best` tag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
from pipeline.runtime.distributed import DistInfo
from pipeline.runtime.io import LoadedCheckpoint, read_checkpoint
from pipeline.tasks.ve import VEEvalConfig, build_ve_from_checkpoint, evaluate_ve_model, label_ids
from pipeline.train.albef_task import AlbefTask, batch_tensors
from pipeline.train.launch import config_error_exit, run_training, strip_launcher_keys
from pipeline.train.task import StepContext


@dataclass
class VEModelConfig(ModelConfig):
    """ModelConfig at the fine-tuning resolution, plus the distillation switch (ITC fields unused)."""

    image_res: int = 384  # px (paper: 384; pos-embed resampled from the checkpoint's)
    distill: bool = True  # momentum teacher + soft targets, weight train.alpha (official VE.yaml: True)


@dataclass
class VEDataConfig(DataConfig):
    """`albef prep snli_ve` folders: training shards (DataConfig) plus the validation split."""

    max_tokens: int = 40  # tokenizer max length (official: no cut beyond 30 words of pre_caption)
    val: str | None = None  # `albef prep snli_ve --split val` folder (SNLI-VE dev); None = no validation


@dataclass
class VETrainConfig(TrainConfig):
    """TrainConfig with the official VE.yaml values."""

    batch_size: int = 32  # (image, hypothesis) pairs per GPU per micro-step
    epochs: int = 5
    alpha_ramp_epochs: float = 0.0  # VE.yaml warm_up False: alpha is 0.4 from the first step


@dataclass
class VEOptimConfig(OptimConfig):
    """AdamW lr 2e-5, warm-up from 1e-5 over the first epoch, cosine to 1e-6 (VE.yaml)."""

    lr: float = 2e-5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 2068  # one epoch: 529,527 train pairs / (32 x 8 GPUs)


@dataclass
class VEConfig(TrainingStageConfig):
    """`albef finetune ve`: the shared sections with VE defaults + the evaluation knobs."""

    model: VEModelConfig = field(default_factory=VEModelConfig)
    data: VEDataConfig = field(default_factory=VEDataConfig)
    train: VETrainConfig = field(default_factory=VETrainConfig)
    optim: VEOptimConfig = field(default_factory=VEOptimConfig)
    eval: VEEvalConfig = field(default_factory=VEEvalConfig)


def check_runtime(checkpoint: str) -> Callable[[VEConfig, DistInfo, str], None]:
    """The stage's checks that need the file system (ConfigError naming the key)."""

    def _check(cfg: VEConfig, info: DistInfo, device: str) -> None:
        check(Path(checkpoint).exists(), "checkpoint", f"not found: {checkpoint}")
        folders = [(f"data.train[{i}]", f) for i, f in enumerate(cfg.data.train)]
        check_prep_folders(folders + ([("data.val", cfg.data.val)] if cfg.data.val is not None else []))

    return _check


class VETask(AlbefTask):
    """SNLI-VE fine-tuning: distilled cross-entropy on (image, hypothesis) pairs, validated by accuracy."""

    name = "finetune_ve"
    best_metric = "accuracy"
    finetune = True
    epoch_counts = "captions"  # one pass over the hypotheses (the loader draws one per image visit)

    @staticmethod
    def evaluate_model(model: Any, data: str, cfg: Any, device: torch.device, **kw: Any) -> dict[str, Any]:
        """The split's accuracy report (pipeline/tasks/ve.py); NLVR2 swaps in its own."""
        return evaluate_ve_model(model, data, cfg, device, **kw)

    def __init__(self, cfg: VEConfig, checkpoint: str) -> None:
        super().__init__(cfg)
        self.checkpoint = checkpoint
        self._loaded: LoadedCheckpoint | None = None

    def queue_size(self) -> int | None:
        return None  # the VE model has no ITC queue

    def build_model(self) -> nn.Module:
        if self._loaded is None:
            self._loaded = read_checkpoint(self.checkpoint)
        model, _ = build_ve_from_checkpoint(self._loaded.state_dict, self.model_config(), self.cfg.model.distill)
        return model

    def model_inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = batch_tensors(batch, device, ("image", "input_ids", "attention_mask"))
        if "label" not in batch:
            raise ValueError("training samples carry no `labels`: data.train must be `albef prep snli_ve` folders")
        inputs["targets"] = label_ids(batch["label"]).to(device, non_blocking=True)
        return inputs

    def validate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Accuracy on `data.val` (collective): `accuracy` and `accuracy_<label>`."""
        if self.cfg.data.val is None:
            return {}
        result = self.evaluate_model(
            model,
            self.cfg.data.val,
            self.cfg.eval,
            ctx.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
            tokenizer=self.tokenizer,
        )
        return {"accuracy": result["accuracy"], **{f"accuracy_{k}": v for k, v in result["per_class"].items()}}

    def export_extra(self) -> dict[str, Any]:
        return {**super().export_extra(), "task": "ve", "distill": self.cfg.model.distill}


def finetune_ve(
    config: str, checkpoint: str, output_dir: str, resume: str = "auto", overrides: dict[str, Any] | None = None
) -> int:
    """Run SNLI-VE fine-tuning; returns the exit code (0 / 75 preempted / 2 bad config / 1 failure)."""
    try:
        cfg = load_config(VEConfig, config, strip_launcher_keys(overrides))
    except ConfigError as err:
        return config_error_exit(err)
    return run_training(
        cfg, output_dir, resume, make_task=lambda info: VETask(cfg, checkpoint), check=check_runtime(checkpoint)
    )
