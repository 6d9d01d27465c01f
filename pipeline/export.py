"""`albef export`: one consolidated `{'model': state_dict}` file, readable without DeepSpeed.

    albef export --checkpoint runs/4m --output albef_4m.pth [--layout ours|official]

The source is a DeepSpeed checkpoint (run folder, checkpoints folder or tag folder; see
pipeline/checkpoint.py) or an already exported file (to switch layouts). Weights come from the
module state dict in the tag's `mp_rank_00_model_states.pt` (every parameter and buffer: momentum
twins and queues included, fp32). When the engine trained in fp16/bf16 those module parameters
are rounded copies, so the trainable ones are replaced by the fp32 master weights gathered from
the ZeRO partitions (DeepSpeed's zero_to_fp32): the export is the full-precision model.

File contents: 'model' (the state dict, our layout or the official one via model/convert.py
`to_official`), 'model_config' (ALBEFConfig as a dict, to rebuild the model), 'meta' (layout,
source checkpoint, step). Written to a temporary name, then renamed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline import checkpoint

logger = logging.getLogger(__name__)

Layout = Literal["ours", "official"]


def _fp32_master(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def load_deepspeed_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 state dict in our layout, client state) of a DeepSpeed checkpoint."""
    ckpt_dir, tag = checkpoint.locate(path)
    states = torch.load(ckpt_dir / tag / checkpoint.MODEL_STATES, map_location="cpu", weights_only=False)
    module: dict[str, torch.Tensor] = dict(states["module"])
    half = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
    if half:
        master = _fp32_master(ckpt_dir, tag)
        for key in half:
            if key not in master:
                raise KeyError(f"{ckpt_dir / tag}: no fp32 master weight for {key} ({module[key].dtype})")
            if master[key].shape != module[key].shape:
                raise ValueError(
                    f"{key}: fp32 master shape {tuple(master[key].shape)} != module {tuple(module[key].shape)}"
                )
            module[key] = master[key].detach().float()
        logger.info("replaced %d %s parameters by their fp32 master weights", len(half), module_dtype(states))
    client = {k: v for k, v in states.items() if k in ("run", "data", "config", "model_config", "task", "world_size")}
    client["source"] = str(ckpt_dir / tag)
    return module, client


def module_dtype(states: dict[str, Any]) -> str:
    dtypes = {str(v.dtype) for v in states["module"].values() if v.is_floating_point()}
    return "/".join(sorted(dtypes))


def export(checkpoint: str, output: str, layout: Layout = "ours") -> str:
    """Write the consolidated file; returns its path. Raises FileNotFoundError / ValueError."""
    from model.convert import from_official, to_official

    if layout not in ("ours", "official"):
        raise ValueError(f"layout must be 'ours' or 'official', got {layout!r}")
    src = Path(checkpoint)
    if src.is_file():  # an exported file: re-export (e.g. ours -> official)
        data = torch.load(src, map_location="cpu", weights_only=True)
        meta = dict(data.get("meta", {}))
        state, client = data["model"], {"model_config": data.get("model_config"), "source": str(src)}
        if meta.get("layout") == "official":
            from model.config import config_from_dict

            state, _ = from_official(state, config_from_dict(data["model_config"]))
    else:
        state, client = load_deepspeed_state(src)
    out_state = to_official(state) if layout == "official" else state
    payload = {
        "model": out_state,
        "model_config": client.get("model_config"),
        "meta": {"layout": layout, "source": client.get("source"), "step": (client.get("run") or {}).get("step")},
    }
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    logger.info("exported %d tensors (%s layout) from %s to %s", len(out_state), layout, client.get("source"), out)
    return str(out)
