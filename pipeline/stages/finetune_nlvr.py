"""`albef finetune nlvr`: NLVR2 fine-tuning (two-image encoder, 2-way classifier, distillation).

    albef finetune nlvr --config nlvr --checkpoint runs/nlvr_ta --output_dir runs/nlvr \
        [--resume auto|none|PATH] [--data.train=[/data/nlvr2_train] --data.val=/data/nlvr2_dev ...]

CKPT (the initialisation) is a text-assignment run of ours (`albef pretrain --config nlvr_ta`, the
paper's chain) or an official TA checkpoint, loaded as NLVR.py does; an official NLVR checkpoint or
one of our NLVR runs; or any ALBEF pre-training checkpoint (fusion layers duplicated without the TA
step; a warning says so). Position embeddings are resampled to `model.image_res` (384 in the paper).
The classifier head starts from its random init; the momentum teacher is copied from the loaded
weights when the checkpoint has none (`model.teacher_from_checkpoint: false` keeps NLVR.py's quirk:
the teacher stays at its init). `--resume` continues THIS run, the checkpoint then only fixes the
architecture.

What differs from SNLI-VE lives in `NLVRTask` (a VETask): the model (model/heads/nlvr.py), the batch
of image pairs [B, 2, 3, R, R] -> the official [2B, 3, R, R] (B left images, then B right ones), the
True/False labels, and the per-epoch dev accuracy (pipeline/tasks/nlvr.py), which selects `best`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.runtime.io import read_checkpoint
from pipeline.stages.finetune_ve import VEConfig, VEDataConfig, VEModelConfig, VEOptimConfig, VETask, VETrainConfig
from pipeline.stages.finetune_ve import check_runtime as check_ve_runtime
from pipeline.tasks.nlvr import NLVREvalConfig, build_nlvr_from_checkpoint, evaluate_nlvr_model, label_ids
from pipeline.train.albef_task import batch_tensors
from pipeline.train.launch import config_error_exit, run_training, strip_launcher_keys
from pipeline.train.task import StepContext, StepOutput


@dataclass
class NLVRModelConfig(VEModelConfig):
    """VE's model section (384 px, distillation) plus the teacher's initialisation."""

    # true: a checkpoint without momentum weights (a TA one) gives the teacher the loaded weights.
    # false: NLVR.py's order (copy_params() before the load): the teacher keeps its random/BERT init.
    teacher_from_checkpoint: bool = True


@dataclass
class NLVRDataConfig(VEDataConfig):
    """`albef prep nlvr2` folders: training shards plus the validation split (`data.val`: NLVR2 dev)."""

    max_tokens: int = 40  # tokenizer max length (official NLVR.py: padding='longest', no cut beyond 30 words)


@dataclass
class NLVRTrainConfig(VETrainConfig):
    """TrainConfig with the official NLVR.yaml values."""

    batch_size: int = 16  # sentences (image pairs) per GPU per micro-step
    epochs: int = 10
    alpha_ramp_epochs: float = 1.0  # NLVR.yaml warm_up True: alpha ramps from 0 over the first epoch


@dataclass
class NLVROptimConfig(VEOptimConfig):
    """AdamW lr 2e-5, warm-up from 1e-5 over the first epoch, cosine to 1e-6 (NLVR.yaml)."""

    warmup_steps: int = 675  # one epoch: 86,373 train sentences / (16 x 8 GPUs)


@dataclass
class NLVRConfig(VEConfig):
    """`albef finetune nlvr`: the shared sections with NLVR.yaml defaults + the evaluation knobs."""

    model: NLVRModelConfig = field(default_factory=NLVRModelConfig)
    data: NLVRDataConfig = field(default_factory=NLVRDataConfig)
    train: NLVRTrainConfig = field(default_factory=NLVRTrainConfig)
    optim: NLVROptimConfig = field(default_factory=NLVROptimConfig)
    eval: NLVREvalConfig = field(default_factory=NLVREvalConfig)


class NLVRTask(VETask):
    """NLVR2 fine-tuning: distilled cross-entropy on (image pair, sentence), validated by dev accuracy."""

    name = "finetune_nlvr"

    def build_model(self) -> nn.Module:
        if self._loaded is None:
            self._loaded = read_checkpoint(self.checkpoint)
        m = self.cfg.model
        model, _ = build_nlvr_from_checkpoint(
            self._loaded.state_dict, self.model_config(), m.distill, teacher_from_checkpoint=m.teacher_from_checkpoint
        )
        return model

    def model_inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = batch_tensors(batch, device, ("image", "input_ids", "attention_mask"))
        if inputs["image"].ndim != 5 or "label" not in batch:
            raise ValueError(
                "training samples are not labelled image pairs: data.train must be `albef prep nlvr2` folders"
            )
        inputs["image"] = inputs["image"].transpose(0, 1).flatten(0, 1)  # [B, 2, ...] -> [2B, ...]: lefts, rights
        inputs["targets"] = label_ids(batch["label"]).to(device, non_blocking=True)
        return inputs

    def forward(self, engine: Any, batch: dict, ctx: StepContext) -> StepOutput:
        out = super().forward(engine, batch, ctx)
        return dataclasses.replace(out, num_samples=out.num_samples // 2)  # two images per sample

    @staticmethod
    def evaluate_model(model: Any, data: str, cfg: Any, device: torch.device, **kw: Any) -> dict[str, Any]:
        return evaluate_nlvr_model(model, data, cfg, device, **kw)

    def export_extra(self) -> dict[str, Any]:
        return {**super().export_extra(), "task": "nlvr"}


def finetune_nlvr(
    config: str, checkpoint: str, output_dir: str, resume: str = "auto", overrides: dict[str, Any] | None = None
) -> int:
    """Run NLVR2 fine-tuning; returns the exit code (0 / 75 preempted / 2 bad config / 1 failure)."""
    try:
        cfg = load_config(NLVRConfig, config, strip_launcher_keys(overrides))
    except ConfigError as err:
        return config_error_exit(err)
    return run_training(
        cfg,
        output_dir,
        resume,
        make_task=lambda info: NLVRTask(cfg, checkpoint),
        check=check_ve_runtime(checkpoint),
    )
