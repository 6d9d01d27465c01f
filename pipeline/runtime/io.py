"""Atomic writes and weights-only reads: every file the pipeline writes or loads goes through here.

Writes go to a temporary name in the target folder, are flushed to disk, then renamed over the
target, so a crash leaves either the old file or the new one, never half of one.

Reads of weights never execute code: torch files load with `weights_only=True` (plain tensors,
containers and a few allow-listed value types), safetensors cannot carry code at all. A
checkpoint can be given as any of:
    a run folder / checkpoints folder / DeepSpeed tag folder  (our training output)
    a `.safetensors` file                                    (our export; fp32 tensors)
    a `.pth` / `.pt` file holding a state dict or {'model': state_dict, ...}  (our export, official ALBEF)
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from safetensors.torch import load_file, save_file

from pipeline.runtime import checkpoint

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_path)`, fsync, rename to `path` (parents created). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return write_atomic(path, write)


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False))


def torch_save_atomic(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def safetensors_save_atomic(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """A `.safetensors` file of contiguous CPU tensors, each its own copy: safetensors refuses
    tensors that share storage (tied weights, views of one flat buffer)."""
    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(owned, str(tmp), metadata=metadata))


# --------------------------------------------------------------------------------------------------
# Weights-only reads
# --------------------------------------------------------------------------------------------------


class CheckpointReadError(ValueError):
    """A checkpoint that cannot be read safely (wrong kind, not weights-only, malformed)."""


# Plain-data classes DeepSpeed pickles into its optimizer states (loss scaler settings, the ZeRO
# stage enum, fragment offsets). Allowing them lets the weights-only unpickler rebuild them from
# their attributes; it still refuses every other global, so no `__reduce__` payload can run.
DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def torch_load_weights_only(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load` that refuses anything but tensors, plain containers and DeepSpeed's plain-data
    classes above (never runs pickled code)."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every refusal and corruption is reported the same way
        raise CheckpointReadError(f"{path}: cannot read as a weights-only torch file ({_why(err)})") from None


def _why(err: Exception) -> str:
    """One line from torch's multi-paragraph weights-only refusal: the unpickler's own reason
    (e.g. "Unsupported global: GLOBAL io.open was not an allowed global by default")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch puts ANSI bold in this message
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
    reason = found.group(1) if found else (text.strip().splitlines() or [type(err).__name__])[0]
    return " ".join(reason.split())[:300]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file (`.safetensors` or torch pickle) as a dict of tensors; {'model': sd} is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - SafetensorError and OSError alike: not a readable file
            raise CheckpointReadError(f"{path}: cannot read as safetensors ({err})") from None
    raw = torch_load_weights_only(path)
    sd = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointReadError(f"{path}: expected a state dict or {{'model': state_dict}}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


@dataclass
class LoadedCheckpoint:
    """Weights in our layout or the official one, plus what the file says about itself."""

    state_dict: dict[str, torch.Tensor]
    model_config: dict[str, Any] | None  # ALBEFConfig.to_dict() when the checkpoint carries it
    step: int | None  # optimizer step when known
    kind: str  # "deepspeed" | "file"
    source: str  # the file or tag folder read
    # What else it says about itself: an export's `meta` (layout, source, card facts) or a DeepSpeed
    # tag's client state (run, data, config, task...).
    meta: dict[str, Any] = field(default_factory=dict)
    eval_image_res: int | None = None  # px, the resolution its run evaluates at (pretraining: model.eval_image_res)


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Any supported checkpoint kind (see the module docstring) -> state dict + metadata, weights-only."""
    p = Path(path)
    if p.is_dir():
        state, client = read_deepspeed_state(p)
        run = client.get("run") or {}
        res = _int_or_none(client.get("eval_image_res"))
        return LoadedCheckpoint(
            state, client.get("model_config"), run.get("step"), "deepspeed", client["source"], client, res
        )
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p} (expected a run folder, a tag folder or a file)")
    if p.suffix == ".safetensors":
        config, meta = _sidecar(p)
        step, res = _int_or_none(meta.get("step")), _int_or_none(meta.get("eval_image_res"))
        return LoadedCheckpoint(read_state_dict(p), config, step, "file", str(p), meta, res)
    raw = torch_load_weights_only(p)
    sd = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointReadError(f"{p}: expected a state dict or {{'model': state_dict}}")
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    config = raw.get("model_config") if isinstance(raw.get("model_config"), dict) else None
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    res = _int_or_none(raw.get("eval_image_res")) or _int_or_none(meta.get("eval_image_res"))
    return LoadedCheckpoint(tensors, config, _int_or_none(meta.get("step")), "file", str(p), meta, res)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sidecar(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(model_config, meta) from `<name>.json` beside an exported `.safetensors` (written by
    `albef export`); (None, {}) when there is none."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None, {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointReadError(f"{side}: unreadable model config beside {path.name} ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointReadError(f"{side}: expected a JSON object beside {path.name}")
    config, meta = data.get("model_config"), data.get("meta")
    return (config if isinstance(config, dict) else None), (meta if isinstance(meta, dict) else {})


def read_deepspeed_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state dict in our layout, client state) of a DeepSpeed checkpoint, weights-only.

    When the engine trained in fp16/bf16 the module parameters in the model-states file are rounded
    copies, so the trainable ones are replaced by the fp32 master weights held in the ZeRO optimizer
    partitions (read weights-only too).
    """
    ckpt_dir, tag = checkpoint.locate(path)
    states = torch_load_weights_only(ckpt_dir / tag / checkpoint.MODEL_STATES)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise CheckpointReadError(f"{ckpt_dir / tag}: no 'module' state dict in {checkpoint.MODEL_STATES}")
    module: dict[str, torch.Tensor] = dict(states["module"])
    half = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
    if half:
        master = checkpoint.fp32_master_weights(ckpt_dir, tag, states, torch_load_weights_only)
        for key in half:
            if key not in master:
                raise CheckpointReadError(f"{ckpt_dir / tag}: no fp32 master weight for {key} ({module[key].dtype})")
            if master[key].shape != module[key].shape:
                raise CheckpointReadError(
                    f"{key}: fp32 master shape {tuple(master[key].shape)} != module {tuple(module[key].shape)}"
                )
            module[key] = master[key].detach().float()
        logger.info("replaced %d half-precision parameters by their fp32 master weights", len(half))
    client = {
        k: v
        for k, v in states.items()
        if k in ("run", "data", "config", "model_config", "eval_image_res", "task", "world_size", "initial_checkpoint")
    }
    client["source"] = str(ckpt_dir / tag)
    return module, client
