"""The DeepSpeed config dict: a JSON file for the engine's own settings, the experiment config for
everything the two could disagree on.

The JSON (ds_configs/*.json) owns ZeRO, precision, loss scaling, buckets and the optimizer type.
Batch geometry, gradient accumulation, clipping and the optimizer's hyper-parameters come from the
experiment config and are injected here, so a run can never train with one batch size while the
schedule assumes another. A JSON that sets one of those keys to a different value is refused.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.config import ConfigError, OptimConfig, resolve_path
from pipeline.train.geometry import TrainGeometry

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]


def resolve_device(requested: str) -> Literal["cpu", "cuda"]:
    """`train.device` -> the device this process trains on (auto = cuda when one is visible)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda requested but torch sees no GPU")
    return requested  # type: ignore[return-value]


def load_ds_json(path: str) -> dict[str, Any]:
    """Read the DeepSpeed JSON named by `deepspeed.config`; errors name that key."""
    file = resolve_path(path)
    if file is None or not file.is_file():
        raise ConfigError("deepspeed.config", f"file not found: {path}")
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError("deepspeed.config", f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("deepspeed.config", f"{file} must hold a JSON object")
    return data


AUTOCAST_KEY = "albef_autocast"  # ours, ignored by DeepSpeed: "bf16" = fp32 engine, forward under bf16 autocast


def precision_of(ds: dict[str, Any]) -> Precision:
    """The compute precision of a DeepSpeed config dict: fp16 / bf16 / fp32.

    bf16 comes either from DeepSpeed's own mode (`"bf16": {"enabled": true}`: the engine casts the
    trained weights to bf16 and keeps fp32 master copies in the optimizer) or from our
    `"albef_autocast": "bf16"` (the engine stays fp32 and the trainer runs the forward under
    `torch.autocast(bfloat16)`: the CPU configs, where it is the faster of the two, see bench/README).
    Either way the trainer autocasts the forward, so fp32 momentum twins meet bf16 activations.
    """
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    autocast = ds.get(AUTOCAST_KEY)
    if autocast not in (None, "bf16"):
        raise ConfigError("deepspeed.config", f'{AUTOCAST_KEY}={autocast!r}: only "bf16" is supported')
    if fp16 and (bf16 or autocast):
        raise ConfigError("deepspeed.config", f"enables fp16 together with bf16 ({AUTOCAST_KEY} or bf16.enabled)")
    return "fp16" if fp16 else "bf16" if (bf16 or autocast) else "fp32"


def build_ds_config(path: str, *, geometry: TrainGeometry, optim: OptimConfig, device: str) -> dict[str, Any]:
    """The DeepSpeed config dict for `deepspeed.initialize`, with the experiment's values injected.

    Raises ConfigError (key `deepspeed.config`) for a JSON that contradicts the experiment config,
    fp16 on the CPU (DeepSpeed refuses it), ZeRO-3 (the EMA needs full parameters on every rank)
    or a JSON LR scheduler (the LR is a pure function of the step, set by the trainer).
    """
    ds = copy.deepcopy(load_ds_json(path))
    injected = {
        "train_micro_batch_size_per_gpu": geometry.micro_batch,
        "gradient_accumulation_steps": geometry.grad_accum_steps,
        "train_batch_size": geometry.global_batch,
        "gradient_clipping": optim.grad_clip,
    }
    for key, value in injected.items():
        _refuse_conflict(ds, key, value)
        ds[key] = value
    if "scheduler" in ds:
        raise ConfigError("deepspeed.config", f"{path} has a 'scheduler' section; the LR comes from the optim.* fields")
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage > 2:
        raise ConfigError(
            "deepspeed.config",
            f"ZeRO stage {stage}: the momentum EMA needs full parameters on every rank, use stage <= 2",
        )
    precision = precision_of(ds)
    if precision == "fp16" and device == "cpu":
        raise ConfigError(
            "deepspeed.config",
            f"{path} enables fp16, which DeepSpeed refuses on the CPU; use ds_configs/cpu.json (fp32) or zero2_bf16.json",
        )
    ds["optimizer"] = _optimizer_section(ds.get("optimizer"), optim, path)
    return ds


def _refuse_conflict(ds: dict[str, Any], key: str, value: Any) -> None:
    current = ds.get(key, "auto")
    if current != "auto" and current != value:
        raise ConfigError(
            "deepspeed.config",
            f"sets {key}={current!r} but the experiment config gives {value!r}; remove it from the JSON (it is injected)",
        )


def _optimizer_section(section: dict[str, Any] | None, optim: OptimConfig, path: str) -> dict[str, Any]:
    section = copy.deepcopy(section) if section else {"type": "AdamW", "params": {}}
    if str(section.get("type", "")).lower() not in ("adam", "adamw"):
        raise ConfigError(
            "deepspeed.config",
            f"optimizer type {section.get('type')!r}: only Adam/AdamW (the paper's AdamW) is supported",
        )
    params = dict(section.get("params", {}))
    wanted = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    for key, value in wanted.items():
        current = params.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                "deepspeed.config",
                f"sets optimizer.params.{key}={current!r} but optim.{key} gives {value!r}; remove it from the JSON",
            )
        params[key] = value
    if str(section["type"]).lower() == "adam":
        params.setdefault("adam_w_mode", True)  # decoupled weight decay, as AdamW in the paper
    section["params"] = params
    return section
