"""`albef finetune vqa`: VQA v2 fine-tuning (answer decoder on the question states, with distillation).

    albef finetune vqa --config vqa --checkpoint runs/4m --output_dir runs/vqa \
        [--resume auto|none|PATH] [--data.train=[/data/vqa_train,/data/vqa_val,/data/vg_qa] ...]

CKPT (the initialisation) is a pretraining run folder of ours, an exported file, an official
ALBEF_4M.pth / ALBEF.pth (the official VQA.py key loop builds the answer decoder from the fusion
layers, the decoder embeddings and MLM head from the text encoder's) or an official/our VQA
checkpoint; position embeddings are resampled to `model.image_res` (384 in the paper). The training
set is a list of `albef prep vqa` folders (the paper: VQA v2 train + val + Visual Genome QA).
`--resume` continues THIS run, the initial checkpoint then only fixes the architecture.

What differs from SNLI-VE fine-tuning lives in `VQATask` (an AlbefTask): the model
(model/heads/vqa.py), the batch -> model inputs (the drawn question, all its unique answers with the
official weights), an epoch = one pass over the questions (as the official loop) and the per-epoch
validation VQA accuracy on `data.val` (pipeline/tasks/vqa.py), which selects the `best` tag.
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
from pipeline.tasks.vqa import (
    VQAEvalConfig,
    build_vqa_from_checkpoint,
    check_vqa_weights,
    evaluate_vqa_model,
    read_answer_list,
    resolve_answer_list,
    tokenize_answers,
    training_answers,
)
from pipeline.train.albef_task import AlbefTask, batch_tensors
from pipeline.train.launch import config_error_exit, run_training, strip_launcher_keys
from pipeline.train.task import StepContext


@dataclass
class VQAModelConfig(ModelConfig):
    """ModelConfig at the fine-tuning resolution, plus the distillation switch (ITC fields unused)."""

    image_res: int = 384  # px (paper: 384; pos-embed resampled from the checkpoint's)
    distill: bool = True  # momentum teacher + soft targets, weight train.alpha (official VQA.yaml: True)


@dataclass
class VQADataConfig(DataConfig):
    """`albef prep vqa` folders: training shards (DataConfig) plus the validation split."""

    max_tokens: int = 25  # question tokenizer max length (official VQA.py: max_length 25)
    max_answer_tokens: int = 16  # answer tokenizer max length ([CLS] answer [SEP])
    val: str | None = None  # `albef prep vqa` folder with answers; None = no validation


@dataclass
class VQATrainConfig(TrainConfig):
    """TrainConfig with the official VQA.yaml values."""

    batch_size: int = 32  # questions per GPU per micro-step
    epochs: int = 8
    alpha_ramp_epochs: float = 1.0  # VQA.yaml warm_up True: alpha ramps from 0 over the first epoch


@dataclass
class VQAOptimConfig(OptimConfig):
    """AdamW lr 2e-5, warm-up from 1e-5 over 400 steps, cosine to 1e-6 (VQA.yaml + VQA.py)."""

    lr: float = 2e-5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 400  # VQA.py: warmup_epochs 4 scheduler steps, one per 100 iterations


@dataclass
class VQAConfig(TrainingStageConfig):
    """`albef finetune vqa`: the shared sections with VQA defaults + the evaluation knobs."""

    model: VQAModelConfig = field(default_factory=VQAModelConfig)
    data: VQADataConfig = field(default_factory=VQADataConfig)
    train: VQATrainConfig = field(default_factory=VQATrainConfig)
    optim: VQAOptimConfig = field(default_factory=VQAOptimConfig)
    eval: VQAEvalConfig = field(default_factory=VQAEvalConfig)


class VQATask(AlbefTask):
    """VQA fine-tuning: weighted answer loss with distillation, validated by VQA accuracy."""

    name = "finetune_vqa"
    best_metric = "accuracy"
    finetune = True
    epoch_counts = "captions"  # one pass over the questions (the loader draws one per image visit)

    def __init__(self, cfg: VQAConfig, checkpoint: str) -> None:
        super().__init__(cfg)
        self.checkpoint = checkpoint
        self._loaded: LoadedCheckpoint | None = None

    def queue_size(self) -> int | None:
        return None  # the VQA model has no ITC queue

    def initial_weights(self) -> LoadedCheckpoint:
        """The checkpoint to start from, read once (weights-only)."""
        if self._loaded is None:
            self._loaded = read_checkpoint(self.checkpoint)
        return self._loaded

    def build_model(self) -> nn.Module:
        model, _ = build_vqa_from_checkpoint(
            self.initial_weights().state_dict,
            self.model_config(),
            self.cfg.model.distill,
            self.cfg.eval.first_token_twice,
        )
        return model

    def model_inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = batch_tensors(batch, device, ("image",))
        if "label" not in batch:
            raise ValueError("training samples carry no `labels`: data.train must be `albef prep vqa` folders")
        answers, weights, per_question = training_answers(batch["label"])
        answer_ids, answer_mask = tokenize_answers(self.tokenizer, answers, self.cfg.data.max_answer_tokens)
        inputs["question_ids"] = batch["input_ids"].to(device, non_blocking=True)
        inputs["question_mask"] = batch["attention_mask"].to(device, non_blocking=True)
        inputs["answer_ids"], inputs["answer_mask"] = answer_ids.to(device), answer_mask.to(device)
        inputs["answer_weights"], inputs["answers_per_question"] = weights.to(device), per_question.to(device)
        return inputs

    def validate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """VQA accuracy on `data.val` (collective) with the candidate answers of `eval.answer_list`."""
        if self.cfg.data.val is None:
            return {}
        path = resolve_answer_list(self.cfg.eval.answer_list, self.cfg.data.train[0])
        assert path is not None  # check_runtime refused a missing list
        result = evaluate_vqa_model(
            model,  # type: ignore[arg-type]
            self.cfg.data.val,
            read_answer_list(path),
            self.cfg.eval,
            ctx.device,
            tokenizer=self.tokenizer,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        if result["accuracy"] is None:
            raise ValueError(f"data.val {self.cfg.data.val} has no answers (a test split?): nothing to validate")
        return {"accuracy": result["accuracy"]}

    def export_extra(self) -> dict[str, Any]:
        return {**super().export_extra(), "task": "vqa", "distill": self.cfg.model.distill}


def check_runtime(task: VQATask) -> Callable[[VQAConfig, DistInfo, str], None]:
    """The stage's checks that need the file system (ConfigError naming the key), the initial
    checkpoint included: it is read here (weights-only), checked against the VQA model and kept for
    `build_model`, so a file that cannot be read or does not fit fails before the run folder is written."""

    def _check(cfg: VQAConfig, info: DistInfo, device: str) -> None:
        check(Path(task.checkpoint).exists(), "checkpoint", f"not found: {task.checkpoint}")
        folders = [(f"data.train[{i}]", f) for i, f in enumerate(cfg.data.train)]
        check_prep_folders(folders + ([("data.val", cfg.data.val)] if cfg.data.val is not None else []))
        if cfg.data.val is not None:
            path = resolve_answer_list(cfg.eval.answer_list, cfg.data.train[0])
            check(path is not None, "eval.answer_list", f"not given and {cfg.data.train[0]} has no answer_list.json")
            try:
                read_answer_list(path)  # type: ignore[arg-type]
            except (OSError, ValueError) as err:
                raise ConfigError("eval.answer_list", str(err)) from None
        try:
            check_vqa_weights(task.initial_weights().state_dict, task.model_config(), cfg.model.distill)
        except (OSError, ValueError) as err:
            raise ConfigError("checkpoint", str(err)) from None

    return _check


def finetune_vqa(
    config: str, checkpoint: str, output_dir: str, resume: str = "auto", overrides: dict[str, Any] | None = None
) -> int:
    """Run VQA fine-tuning; returns the exit code (0 / 75 preempted / 2 bad config / 1 failure)."""
    try:
        cfg = load_config(VQAConfig, config, strip_launcher_keys(overrides))
    except ConfigError as err:
        return config_error_exit(err)
    task = VQATask(cfg, checkpoint)
    return run_training(cfg, output_dir, resume, make_task=lambda info: task, check=check_runtime(task))
