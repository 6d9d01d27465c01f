"""`albef pretrain`: ALBEF pretraining (ITC + ITM + MLM) as a TrainTask run by the shared Trainer.

    albef pretrain --config pipeline/configs/pretrain_4m.yaml --output_dir runs/4m \
        [--resume auto|none|PATH] [--train.max_steps=20 --data.train=[/data/cc3m,/data/coco] ...]

Under torchrun / srun every rank runs the same command. Exit codes: 0 finished, 75 preempted
(checkpoint saved; requeue), 2 bad config, 1 failure (pipeline/runtime/exit_codes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.albef import build_albef
from model.masking import mask_tokens
from pipeline.config import ConfigError, TrainingStageConfig, load_config
from pipeline.data import check_prep_folders
from pipeline.runtime.distributed import DistInfo
from pipeline.train.albef_task import AlbefTask, batch_tensors
from pipeline.train.launch import config_error_exit, run_training, strip_launcher_keys
from pipeline.weights.init import init_from_pretrained


@dataclass
class PretrainConfig(TrainingStageConfig):
    """`albef pretrain`: ITC + ITM + MLM on image-text shards (the shared sections, paper defaults)."""


def check_pretrain_runtime(cfg: PretrainConfig, info: DistInfo, device: str) -> None:
    """The stage's checks that need the file system (ConfigError naming the key)."""
    check_prep_folders([(f"data.train[{i}]", f) for i, f in enumerate(cfg.data.train)])


class PretrainTask(AlbefTask):
    """ALBEF pretraining: the model of model/albef.py with the official DeiT/BERT initialisation."""

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        tok = self.tokenizer
        self.special_ids = sorted({tok.pad_token_id, tok.cls_token_id, tok.sep_token_id})

    def build_model(self) -> nn.Module:
        model = build_albef(self.model_config())
        m = self.cfg.model
        if m.vision_weights or m.text_weights:
            # DeiT into the ViT, BERT into text + fusion layers, then momentum twins <- trained weights;
            # raises on any unexplained missing/unexpected key (the classic silent-DeiT failure).
            init_from_pretrained(model, vision=m.vision_weights, text=m.text_weights)
        return model

    def model_inputs(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        inputs = batch_tensors(batch, device, ("image", "input_ids", "attention_mask"))
        inputs["mlm_input_ids"], inputs["mlm_labels"] = mask_tokens(
            inputs["input_ids"],
            vocab_size=self.tokenizer.vocab_size,
            mask_token_id=self.tokenizer.mask_token_id,
            special_token_ids=self.special_ids,
            probability=self.cfg.model.mlm_probability,
        )
        return inputs


def pretrain(config: str, output_dir: str, resume: str = "auto", overrides: dict[str, Any] | None = None) -> int:
    """Run pretraining; returns the process exit code (0 / 75 preempted / 2 bad config / 1 failure)."""
    try:
        cfg = load_config(PretrainConfig, config, strip_launcher_keys(overrides))
    except ConfigError as err:
        return config_error_exit(err)
    return run_training(cfg, output_dir, resume, make_task=lambda info: PretrainTask(cfg), check=check_pretrain_runtime)
