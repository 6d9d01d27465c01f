"""`albef export`: one consolidated `{'model': state_dict}` file, readable without DeepSpeed.

    albef export --checkpoint runs/4m --output albef_4m.pth [--layout ours|official]

The source is a DeepSpeed checkpoint (run folder, checkpoints folder or tag folder; see
pipeline/runtime/checkpoint.py) or an already exported file (to switch layouts). Weights come from the
module state dict in the tag's `mp_rank_00_model_states.pt` (every parameter and buffer: momentum
twins and queues included, fp32). When the engine trained in fp16/bf16 those module parameters
are rounded copies, so the trainable ones are replaced by the fp32 master weights gathered from
the ZeRO partitions (rebuilt weights-only in pipeline/runtime/checkpoint.py): the export is the full-precision model.

File contents: 'model' (the state dict, our layout or the official one via model/convert.py
`to_official`), 'model_config' (ALBEFConfig as a dict, to rebuild the model), 'eval_image_res' (px the
run's zero-shot evaluation uses; pretraining runs), 'meta' (layout,
source checkpoint, step). Written to a temporary name, then renamed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from model.config import ALBEFConfig
from model.convert import from_official, to_official
from pipeline.config import from_dict
from pipeline.runtime.io import read_checkpoint, read_deepspeed_state, torch_load_weights_only, torch_save_atomic

logger = logging.getLogger(__name__)

Layout = Literal["ours", "official"]


def export(checkpoint: str, output: str, layout: Layout = "ours") -> str:
    """Write the consolidated file; returns its path. Raises FileNotFoundError / ValueError."""
    if layout not in ("ours", "official"):
        raise ValueError(f"layout must be 'ours' or 'official', got {layout!r}")
    src = Path(checkpoint)
    if src.is_file():  # an exported file: re-export (e.g. ours -> official)
        data = torch_load_weights_only(src)
        loaded = read_checkpoint(src)
        meta = dict(data.get("meta", {})) if isinstance(data, dict) else {}
        state, model_config, step, source = loaded.state_dict, loaded.model_config, loaded.step, str(src)
        eval_image_res = loaded.eval_image_res
        if meta.get("layout") == "official":
            if model_config is None:
                raise ValueError(f"{src}: an official-layout export without its model_config cannot be converted")
            state, _ = from_official(state, from_dict(ALBEFConfig, model_config, "model_config"))
    else:
        state, client = read_deepspeed_state(src)
        model_config, step, source = client.get("model_config"), (client.get("run") or {}).get("step"), client["source"]
        eval_image_res = client.get("eval_image_res")
    out_state = to_official(state) if layout == "official" else state
    payload = {
        "model": out_state,
        "model_config": model_config,
        "eval_image_res": eval_image_res,  # px the run evaluates at (None: its model resolution)
        "meta": {"layout": layout, "source": source, "step": step},
    }
    out = torch_save_atomic(output, payload)
    logger.info("exported %d tensors (%s layout) from %s to %s", len(out_state), layout, source, out)
    return str(out)
