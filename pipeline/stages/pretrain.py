"""`albef pretrain`: ALBEF pretraining (ITC + ITM + MLM) as a TrainTask run by the shared Trainer.

    albef pretrain --config pipeline/configs/pretrain_4m.yaml --output_dir runs/4m \
        [--resume auto|none|PATH] [--train.max_steps=20 --data.train=[/data/cc3m,/data/coco] ...]
    albef pretrain --config nlvr_ta --output_dir runs/nlvr_ta --checkpoint runs/4m   # NLVR2's text assignment

Under torchrun / srun every rank runs the same command. Exit codes: 0 finished, 75 preempted
(checkpoint saved; requeue), 2 bad config, 1 failure (pipeline/runtime/exit_codes.py).

Initial weights (`model.init`): `pretrained` (the paper) starts the ViT from DeiT-B/16 and the text and
fusion layers from bert-base-uncased; both are read, converted and shape-checked in the start-up checks,
so a missing file or an unreachable hub is exit code 2 naming the key before anything is written, and
kept for `build_model`. `scratch` starts from random weights (tiny test models) and says so in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from model.albef import build_albef
from model.masking import mask_tokens
from pipeline.config import ConfigError, ModelConfig, TrainingStageConfig, build_model_config, check, load_config
from pipeline.data import check_prep_folders
from pipeline.runtime.distributed import DistInfo
from pipeline.runtime.io import LoadedCheckpoint, read_checkpoint
from pipeline.tasks.nlvr import build_ta_from_checkpoint
from pipeline.train.albef_task import AlbefTask, batch_tensors
from pipeline.train.launch import config_error_exit, run_training, strip_launcher_keys
from pipeline.train.task import StepContext, StepOutput
from pipeline.weights.init import (
    InitialWeights,
    WeightSourceError,
    apply_initial_weights,
    read_initial_weights,
    weight_source_kind,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainModelConfig(ModelConfig):
    """ModelConfig with where pretraining starts from and the resolution its checkpoints are evaluated at."""

    # pretrained: ViT <- vision_weights (DeiT-B/16), text + fusion layers <- text_weights (bert-base-uncased),
    # as the paper; both fields required. scratch: random init (tiny test models); both fields must be null.
    # checkpoint: the weights come from `--checkpoint` (task: text_assignment); both fields must be null.
    init: Literal["pretrained", "scratch", "checkpoint"] = "pretrained"
    vision_weights: str | None = None  # timm name (deit_base_patch16_224) or a local checkpoint file
    text_weights: str | None = None  # HF name (bert-base-uncased), a local HF model folder or a weights file
    # px, resolution of the zero-shot evaluation of this run's checkpoints (`albef evaluate retrieval`
    # without --image_res; position embeddings resampled); null = image_res. The paper evaluates at 384.
    eval_image_res: int | None = None
    # task: text_assignment only. Divisor of the image-image cosine similarity whose softmax draws each
    # caption's partner image (official: the literal 0.07, i.e. near-duplicates: hard partners). A large
    # value draws partners uniformly (random ones), which a model trained from scratch learns from first
    # (the tiny configs; same finding as pretrain_tiny_cpu.yaml's itm_negatives: random).
    ta_sim_temp: float = 0.07

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check(self.ta_sim_temp > 0, f"{prefix}.ta_sim_temp", f"must be > 0, got {self.ta_sim_temp}")
        for name in ("vision_weights", "text_weights"):
            key, value = f"{prefix}.{name}", getattr(self, name)
            if self.init != "pretrained":
                check(value is None, key, f"must be null with {prefix}.init: {self.init}, got {value!r}")
                continue
            check(
                value is not None,
                key,
                f"{prefix}.init is 'pretrained' (the paper's DeiT-B/16 + bert-base-uncased start): set "
                f"{prefix}.vision_weights and {prefix}.text_weights, or {prefix}.init: scratch for random weights",
            )
            try:
                weight_source_kind("vision" if name == "vision_weights" else "text", str(value))
            except WeightSourceError as err:
                raise ConfigError(key, str(err)) from None
        if self.eval_image_res is not None:
            try:
                build_model_config(dataclasses.replace(self, image_res=self.eval_image_res), seed=0, prefix=prefix)
            except ConfigError as err:
                raise ConfigError(f"{prefix}.eval_image_res", str(err).split(": ", 1)[-1]) from None


@dataclass
class PretrainConfig(TrainingStageConfig):
    """`albef pretrain`: ITC + ITM + MLM on image-text shards (the shared sections, paper defaults), or
    with `task: text_assignment` NLVR2's text-assignment pretraining from `--checkpoint`."""

    # albef: ALBEF pretraining (ITC + ITM + MLM). text_assignment: NLVR2's TA step (Pretrain_nlvr.py):
    # which of two images a caption describes, on the fusion-duplicated encoder, from --checkpoint.
    task: Literal["albef", "text_assignment"] = "albef"
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        from_checkpoint = self.model.init == "checkpoint"
        if (self.task == "text_assignment") != from_checkpoint:
            raise ConfigError(
                "model.init",
                f"task: {self.task} needs model.init: checkpoint (its weights come from --checkpoint)"
                if self.task == "text_assignment"
                else "model.init: checkpoint is for task: text_assignment; ALBEF pretraining starts from "
                "pretrained (DeiT + BERT) or scratch",
            )


def read_pretrain_init(cfg: PretrainConfig) -> InitialWeights | None:
    """The initial weights of `model.init: pretrained`, read and converted (None for scratch).

    A missing file, an unreachable hub (e.g. HF_HUB_OFFLINE=1 without a cached copy) or weights that do
    not fit the model is a ConfigError naming model.vision_weights / model.text_weights.
    """
    m = cfg.model
    if m.init == "scratch":
        return None
    try:
        return read_initial_weights(
            build_model_config(m, seed=cfg.train.seed), vision=m.vision_weights, text=m.text_weights
        )
    except WeightSourceError as err:
        raise ConfigError(f"model.{err.which}_weights", str(err)) from None


def check_pretrain_runtime(cfg: PretrainConfig, info: DistInfo, device: str, task: PretrainTask | None = None) -> None:
    """The stage's checks that need the file system or the hub (ConfigError naming the key).

    With `task`, its initial weights are read now (kept for its build_model), so they fail here.
    """
    check_prep_folders([(f"data.train[{i}]", f) for i, f in enumerate(cfg.data.train)])
    if task is not None:
        task.initial_weights()


class PretrainTask(AlbefTask):
    """ALBEF pretraining: the model of model/albef.py with the official DeiT/BERT initialisation."""

    name = "pretrain"
    # Like the official code (one json entry per caption), an epoch is a pass over the image-caption pairs.
    epoch_counts = "captions"

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        tok = self.tokenizer
        # The official mask() never masks [PAD] and [CLS]; [SEP] is maskable like any word.
        self.unmaskable_ids = sorted({tok.pad_token_id, tok.cls_token_id})
        self._initial: InitialWeights | None = None
        self._initial_read = False

    def initial_weights(self) -> InitialWeights | None:
        """DeiT/BERT weights converted to our layout, read once (None for model.init: scratch)."""
        if not self._initial_read:
            self._initial = read_pretrain_init(self.cfg)
            self._initial_read = True
        return self._initial

    def build_model(self) -> nn.Module:
        model = build_albef(self.model_config())
        weights = self.initial_weights()
        if weights is None:
            logger.warning(
                "model.init is 'scratch': the ViT and BERT start from RANDOM weights "
                "(the paper starts from DeiT-B/16 and bert-base-uncased: model.init: pretrained)"
            )
        else:
            # DeiT into the ViT, BERT into text + fusion layers, then momentum twins <- trained weights;
            # raises on any unexplained missing/unexpected key (the classic silent-DeiT failure).
            apply_initial_weights(model, weights)
            self._initial, self._initial_read = None, False  # the model holds them now: free the host copy
        return model

    def model_inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = batch_tensors(batch, device, ("image", "input_ids", "attention_mask"))
        inputs["mlm_input_ids"], inputs["mlm_labels"] = mask_tokens(
            inputs["input_ids"],
            vocab_size=self.tokenizer.vocab_size,
            mask_token_id=self.tokenizer.mask_token_id,
            special_token_ids=self.unmaskable_ids,
            probability=self.cfg.model.mlm_probability,
        )
        return inputs

    def export_extra(self) -> dict[str, Any]:
        m = self.cfg.model
        return {**super().export_extra(), "eval_image_res": m.eval_image_res or m.image_res}


class TextAssignmentTask(AlbefTask):
    """NLVR2 text-assignment pretraining (Pretrain_nlvr.py): the two-image encoder learns which of two
    images (the caption's own and a similar one, drawn by the model) a caption describes, or neither.

    The model starts from `checkpoint` (pipeline/tasks/nlvr.py: fusion layers duplicated); `--resume`
    continues THIS run, the checkpoint then only fixes the architecture. No momentum model, no queue.
    """

    name = "pretrain_text_assignment"
    epoch_counts = "captions"  # as the official pretrain_dataset json: one entry per caption

    def __init__(self, cfg: PretrainConfig, checkpoint: str) -> None:
        super().__init__(cfg)
        self.checkpoint = checkpoint
        self._loaded: LoadedCheckpoint | None = None

    def read_checkpoint(self) -> LoadedCheckpoint:
        """The initial checkpoint, read once (weights-only); ConfigError naming `checkpoint` when unusable."""
        if self._loaded is None:
            try:
                self._loaded = read_checkpoint(self.checkpoint)
            except (OSError, ValueError) as err:
                raise ConfigError("checkpoint", str(err)) from None
        return self._loaded

    def queue_size(self) -> int | None:
        return None  # the TA model has no ITC queue

    def build_model(self) -> nn.Module:
        model, _ = build_ta_from_checkpoint(
            self.read_checkpoint().state_dict, self.model_config(), sim_temp=self.cfg.model.ta_sim_temp
        )
        self._loaded = None  # the model holds the weights now: free the host copy
        return model

    def model_inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        return batch_tensors(batch, device, ("image", "input_ids", "attention_mask"))

    def forward(self, engine: Any, batch: dict, ctx: StepContext) -> StepOutput:
        # The pairs are drawn from the global RNG, which the trainer seeds per (step, micro-step, rank):
        # the draws replay exactly on resume. No alpha: the TA loss has no distillation.
        inputs = self.model_inputs(batch, ctx.device)
        out = engine(**inputs)
        return StepOutput(
            loss=out.loss,
            scalars={"loss_ta": out.ta_loss, "acc": out.acc},
            num_samples=int(inputs["image"].shape[0]),
        )

    def export_extra(self) -> dict[str, Any]:
        return {**super().export_extra(), "task": "nlvr_text_assignment"}


def pretrain(
    config: str,
    output_dir: str,
    resume: str = "auto",
    overrides: dict[str, Any] | None = None,
    checkpoint: str | None = None,
) -> int:
    """Run pretraining; returns the process exit code (0 / 75 preempted / 2 bad config / 1 failure).

    `checkpoint` (a pretraining run folder, an export or an official ALBEF_4M.pth) is where `task:
    text_assignment` starts; ALBEF pretraining (task: albef) takes none.
    """
    try:
        cfg = load_config(PretrainConfig, config, strip_launcher_keys(overrides))
        if cfg.task == "text_assignment":
            check(checkpoint is not None, "checkpoint", "task: text_assignment starts from --checkpoint CKPT")
        else:
            check(checkpoint is None, "checkpoint", "only task: text_assignment starts from a checkpoint")
    except ConfigError as err:
        return config_error_exit(err)
    if cfg.task == "text_assignment":
        assert checkpoint is not None
        ta = TextAssignmentTask(cfg, checkpoint)

        def check_ta_runtime(cfg: PretrainConfig, info: DistInfo, device: str) -> None:
            check(Path(checkpoint).exists(), "checkpoint", f"not found: {checkpoint}")
            check_prep_folders([(f"data.train[{i}]", f) for i, f in enumerate(cfg.data.train)])
            ta.read_checkpoint()

        return run_training(cfg, output_dir, resume, make_task=lambda info: ta, check=check_ta_runtime)
    task = PretrainTask(cfg)  # reads only the vocabulary; its initial weights are read by the checks

    def check_runtime(cfg: PretrainConfig, info: DistInfo, device: str) -> None:
        check_pretrain_runtime(cfg, info, device, task)

    return run_training(cfg, output_dir, resume, make_task=lambda info: task, check=check_runtime)
