"""`albef pretrain`: ALBEF pretraining (ITC + ITM + MLM) as a TrainTask run by the shared Trainer.

    albef pretrain --config pipeline/configs/pretrain_4m.yaml --output_dir runs/4m \
        [--resume auto|none|PATH] [--train.max_steps=20 --data.train=[/data/cc3m,/data/coco] ...]

Under torchrun / srun every rank runs the same command. Exit codes: 0 finished, 75 preempted
(checkpoint saved; requeue), 2 bad config, 1 failure (see pipeline/launch.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.config import ConfigError, PretrainConfig, check, load_config
from pipeline.distributed import DistInfo
from pipeline.launch import CONFIG_ERROR_EXIT_CODE, run_training, setup_logging, strip_launcher_keys
from pipeline.schedule import alpha_at
from pipeline.task import StepContext, StepOutput, TrainTask, config_train_loader

logger = logging.getLogger(__name__)


def build_model_config(cfg: PretrainConfig) -> Any:
    """ALBEFConfig from the experiment's `model` section (preset sizes + head settings)."""
    from model.config import ALBEFConfig

    m = cfg.model
    preset = ALBEFConfig.tiny if m.preset == "tiny" else ALBEFConfig.base
    return preset(
        image_size=m.image_res,
        embed_dim=m.embed_dim,
        queue_size=m.queue_size,
        momentum=m.momentum,
        temp=m.temp,
        mlm_probability=m.mlm_probability,
        queue_seed=cfg.train.seed,
    )


def check_pretrain_runtime(cfg: PretrainConfig, info: DistInfo, device: str) -> None:
    """Checks that need the world size or the file system (ConfigError naming the key)."""
    gathered = cfg.train.batch_size * info.world_size
    check(
        cfg.model.queue_size % gathered == 0,
        "model.queue_size",
        f"{cfg.model.queue_size} is not a multiple of the gathered micro-batch train.batch_size x world size "
        f"= {cfg.train.batch_size} x {info.world_size} = {gathered} (each micro-step enqueues that many features)",
    )
    for i, folder in enumerate(cfg.data.train):
        check(
            (Path(folder) / "manifest.json").is_file() or Path(folder).is_file(),
            f"data.train[{i}]",
            f"no manifest.json in {folder} (expected an `albef prep` output folder)",
        )


class PretrainTask(TrainTask):
    """ALBEF pretraining: EMA before each optimizer step, enqueue after each micro-batch."""

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, info: DistInfo) -> None:
        from pipeline.text import build_tokenizer, bundled_vocab_path

        self.cfg, self.info = cfg, info
        self.tokenizer = build_tokenizer(cfg.data.vocab or bundled_vocab_path())
        self.special_ids = sorted(
            {self.tokenizer.pad_token_id, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}
        )
        self._samples: int | None = None

    def build_model(self) -> nn.Module:
        from model.albef import build_albef

        model = build_albef(build_model_config(self.cfg))
        m = self.cfg.model
        if m.vision_weights or m.text_weights:
            from pipeline.weights import init_from_pretrained

            # DeiT into the ViT, BERT into text + fusion layers, then momentum twins <- trained weights;
            # raises on any unexplained missing/unexpected key (the classic silent-DeiT failure).
            init_from_pretrained(model, vision=m.vision_weights, text=m.text_weights)
        return model

    def samples_per_epoch(self) -> int:
        if self._samples is None:
            from pipeline.data import load_sources

            self._samples = self.cfg.data.samples_per_epoch or sum(
                s.num_samples for s in load_sources(self.cfg.data.train, self.cfg.data.weights)
            )
        return self._samples

    def train_batches(self, *, start_micro_step: int, segment_steps: int, rank: int, world_size: int):
        return config_train_loader(
            self.cfg, self.tokenizer, start_micro_step=start_micro_step, segment_steps=segment_steps,
            rank=rank, world_size=world_size, finetune=False,
        )

    def begin_step(self, model: nn.Module, ctx: StepContext) -> None:
        model.momentum_update()  # once per optimizer step, before the forward (official order)

    def forward(self, engine: Any, batch: dict, ctx: StepContext) -> StepOutput:
        from model.masking import mask_tokens

        dev = ctx.device
        image = batch["image"].to(dev, non_blocking=True)
        input_ids = batch["input_ids"].to(dev, non_blocking=True)
        attention_mask = batch["attention_mask"].to(dev, non_blocking=True)
        # The global RNG was seeded by the trainer for this (step, micro-step, rank): masking,
        # dropout and hard-negative sampling replay exactly on resume.
        mlm_input_ids, mlm_labels = mask_tokens(
            input_ids,
            vocab_size=self.tokenizer.vocab_size,
            mask_token_id=self.tokenizer.mask_token_id,
            special_token_ids=self.special_ids,
            probability=self.cfg.model.mlm_probability,
        )
        alpha = alpha_at(
            ctx.step,
            alpha=self.cfg.train.alpha,
            ramp_steps=round(self.cfg.train.alpha_ramp_epochs * ctx.steps_per_epoch),
        )
        out = engine(image, input_ids, attention_mask, mlm_input_ids, mlm_labels, alpha)
        scalars = {
            "loss_itc": out.itc_loss,
            "loss_itm": out.itm_loss,
            "loss_mlm": out.mlm_loss,
            "itc_acc": out.itc_acc,
            "itm_acc": out.itm_acc,
            "temp": out.temp,
            "alpha": alpha,
        }
        return StepOutput(loss=out.loss, scalars=scalars, num_samples=int(image.shape[0]), extra=out)

    def end_micro_step(self, model: nn.Module, output: StepOutput, ctx: StepContext) -> None:
        from model.distributed import all_gather_no_grad

        # Every micro-batch's momentum features enter the queue (B x world columns, rank order).
        model.enqueue(all_gather_no_grad(output.extra.image_feat_m), all_gather_no_grad(output.extra.text_feat_m))

    def export_extra(self) -> dict[str, Any]:
        return {"model_config": build_model_config(self.cfg).to_dict()}


def pretrain(config: str, output_dir: str, resume: str = "auto", overrides: dict[str, Any] | None = None) -> int:
    """Run pretraining; returns the process exit code (0 / 75 preempted / 2 bad config / 1 failure)."""
    try:
        cfg = load_config(PretrainConfig, config, strip_launcher_keys(overrides))
    except ConfigError as err:
        setup_logging(0)
        logger.error("%s", err)
        return CONFIG_ERROR_EXIT_CODE
    return run_training(
        cfg, output_dir, resume, make_task=lambda info, device: PretrainTask(cfg, info), check=check_pretrain_runtime
    )
