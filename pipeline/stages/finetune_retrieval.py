"""`albef finetune retrieval`: ITC + ITM fine-tuning with image-id queues, run by the shared Trainer.

    albef finetune retrieval --config retrieval_coco --checkpoint runs/4m --output_dir runs/coco \
        [--resume auto|none|PATH] [--data.train=[/data/coco_train] --data.val=/data/coco_val ...]

CKPT (the initialisation) is anything `albef evaluate retrieval` reads: a pretraining run folder of
ours, an exported file, or an official ALBEF_4M.pth; position embeddings are resampled to
`model.image_res` (384 in the paper). `--resume` continues THIS run (DeepSpeed checkpoints in
DIR/checkpoints), in which case the initial checkpoint only fixes the architecture.

What differs from pretraining lives in `RetrievalTask` (pipeline/task.py explains the interface):
the model (model/retrieval.py), the batch -> model call with the image ids, the enqueue of ids,
the epoch size and the per-epoch validation (the retrieval evaluation on `data.val`), whose
r_mean of `eval.score_for_best` selects the `best` checkpoint tag. The loop, DeepSpeed, resume,
preemption and TensorBoard are the pretraining ones.

Epoch size: the official fine-tuning visits every (image, caption) pair once per epoch; our loader
yields an image with one of its captions drawn at random, so an epoch is sized to the number of
captions of the manifests (data.samples_per_epoch overrides it) and the step counts match the paper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.config import (
    ConfigError,
    DataConfig,
    DeepSpeedSection,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check,
    load_config,
    validate_sections,
)
from pipeline.distributed import DistInfo
from pipeline.launch import CONFIG_ERROR_EXIT_CODE, run_training, setup_logging, strip_launcher_keys
from pipeline.schedule import alpha_at
from pipeline.stages.evaluate_retrieval import EvalConfig
from pipeline.task import StepContext, StepOutput, TrainTask, config_train_loader

logger = logging.getLogger(__name__)


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
    """AdamW, lr 1e-5 cosine to 1e-6, no warm-up (the official warm-up LR equals the LR)."""

    lr: float = 1e-5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 0


@dataclass
class RetrievalConfig:
    """`albef finetune retrieval`: the trainer's sections + the retrieval data and evaluation."""

    model: RetrievalModelConfig = field(default_factory=RetrievalModelConfig)
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    train: RetrievalTrainConfig = field(default_factory=RetrievalTrainConfig)
    optim: RetrievalOptimConfig = field(default_factory=RetrievalOptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, prefix: str = "") -> None:
        validate_sections(self, prefix)
        for name in ("vision_weights", "text_weights"):
            check(
                getattr(self.model, name) is None,
                f"model.{name}",
                "fine-tuning initialises from --checkpoint, not from DeiT/BERT weights",
            )


def build_model_config(cfg: RetrievalConfig) -> Any:
    """ALBEFConfig from the `model` section; the checkpoint's tensors must fit it (else a loud error)."""
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


def check_runtime(checkpoint: str):
    """The stage's checks that need the world size or the file system (ConfigError naming the key)."""

    def _check(cfg: RetrievalConfig, info: DistInfo, device: str) -> None:
        gathered = cfg.train.batch_size * info.world_size
        check(
            cfg.model.queue_size % gathered == 0,
            "model.queue_size",
            f"{cfg.model.queue_size} is not a multiple of train.batch_size x world size = {gathered}",
        )
        check(Path(checkpoint).exists(), "checkpoint", f"not found: {checkpoint}")
        folders = [(f"data.train[{i}]", f) for i, f in enumerate(cfg.data.train)]
        for key, folder in folders + ([("data.val", cfg.data.val)] if cfg.data.val is not None else []):
            check(
                (Path(folder) / "manifest.json").is_file() or Path(folder).is_file(),
                key,
                f"no manifest.json in {folder} (expected an `albef prep` output folder)",
            )

    return _check


class RetrievalTask(TrainTask):
    """Retrieval fine-tuning: EMA before each optimizer step, enqueue features + ids after each micro-batch."""

    name = "finetune_retrieval"
    best_metric = "r_mean"

    def __init__(self, cfg: RetrievalConfig, info: DistInfo, checkpoint: str) -> None:
        from pipeline.text import build_tokenizer, bundled_vocab_path

        self.cfg, self.info, self.checkpoint = cfg, info, checkpoint
        self.tokenizer = build_tokenizer(cfg.data.vocab or bundled_vocab_path())
        self._samples: int | None = None

    def build_model(self) -> nn.Module:
        from model.retrieval import build_retrieval, load_retrieval_state
        from pipeline.stages.evaluate_retrieval import read_checkpoint

        model = build_retrieval(build_model_config(self.cfg))
        load_retrieval_state(model, read_checkpoint(self.checkpoint).state_dict)  # logs what it mapped/skipped
        return model

    def samples_per_epoch(self) -> int:
        if self._samples is None:
            from pipeline.data import load_sources

            d = self.cfg.data
            self._samples = d.samples_per_epoch or sum(s.num_captions for s in load_sources(d.train, d.weights))
        return self._samples

    def train_batches(self, *, start_micro_step: int, segment_steps: int, rank: int, world_size: int):
        return config_train_loader(
            self.cfg, self.tokenizer, start_micro_step=start_micro_step, segment_steps=segment_steps,
            rank=rank, world_size=world_size, finetune=True,
        )

    def begin_step(self, model: nn.Module, ctx: StepContext) -> None:
        model.momentum_update()  # once per optimizer step, before the forward (official order)

    def forward(self, engine: Any, batch: dict, ctx: StepContext) -> StepOutput:
        dev = ctx.device
        image = batch["image"].to(dev, non_blocking=True)
        input_ids = batch["input_ids"].to(dev, non_blocking=True)
        attention_mask = batch["attention_mask"].to(dev, non_blocking=True)
        idx = batch["image_idx"].to(dev, non_blocking=True)  # stable id of (source, image_id)
        ramp = round(self.cfg.train.alpha_ramp_epochs * ctx.steps_per_epoch)
        alpha = alpha_at(ctx.step, alpha=self.cfg.train.alpha, ramp_steps=ramp)
        out = engine(image, input_ids, attention_mask, idx, alpha)
        scalars = {
            "loss_itc": out.itc_loss,
            "loss_itm": out.itm_loss,
            "itc_acc": out.itc_acc,
            "itm_acc": out.itm_acc,
            "temp": out.temp,
            "alpha": alpha,
        }
        return StepOutput(loss=out.loss, scalars=scalars, num_samples=int(image.shape[0]), extra=out)

    def end_micro_step(self, model: nn.Module, output: StepOutput, ctx: StepContext) -> None:
        from model.distributed import all_gather_no_grad

        out = output.extra
        model.enqueue(
            all_gather_no_grad(out.image_feat_m), all_gather_no_grad(out.text_feat_m), all_gather_no_grad(out.idx)
        )

    def validate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Retrieval on `data.val` (collective); `r_mean` = that of eval.score_for_best."""
        if self.cfg.data.val is None:
            return {}
        from pipeline.stages.evaluate_retrieval import evaluate_model

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

    def export_extra(self) -> dict[str, Any]:
        return {"model_config": build_model_config(self.cfg).to_dict()}


def finetune_retrieval(
    config: str, checkpoint: str, output_dir: str, resume: str = "auto", overrides: dict[str, Any] | None = None
) -> int:
    """Run retrieval fine-tuning; returns the exit code (0 / 75 preempted / 2 bad config / 1 failure)."""
    try:
        cfg = load_config(RetrievalConfig, config, strip_launcher_keys(overrides))
    except ConfigError as err:
        setup_logging(0)
        logger.error("%s", err)
        return CONFIG_ERROR_EXIT_CODE
    return run_training(
        cfg,
        output_dir,
        resume,
        make_task=lambda info, device: RetrievalTask(cfg, info, checkpoint),
        check=check_runtime(checkpoint),
    )
