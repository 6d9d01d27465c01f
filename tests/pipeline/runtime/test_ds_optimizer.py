"""Which Adam the GPU configs get: torch's fused AdamW through DeepSpeed's optimizer config (no JIT
build of DeepSpeed's FusedAdam on the compute nodes), decided by DeepSpeed's own selection code."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from pipeline.config import OptimConfig
from pipeline.runtime.ds_config import build_ds_config
from pipeline.train.geometry import TrainGeometry


def _geometry() -> TrainGeometry:
    from pipeline.config import TrainConfig
    from pipeline.train.geometry import derive_geometry

    return derive_geometry(TrainConfig(batch_size=2, max_steps=4), OptimConfig(), world_size=1, samples_per_epoch=64)


@pytest.mark.parametrize("name", ["zero2_fp16.json", "zero2_bf16.json"])
def test_gpu_configs_use_torch_fused_adamw(name: str) -> None:
    ds = build_ds_config(f"ds_configs/{name}", geometry=_geometry(), optim=OptimConfig(), device="cuda")
    params = dict(ds["optimizer"]["params"])
    assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True and params["fused"] is True
    # DeepSpeed 0.19's choice (engine.get_optimizer_configuration): torch_adam -> torch.optim.AdamW,
    # the remaining params (fused=True) passed through; it never imports deepspeed.ops.adam.FusedAdam.
    cls, kwargs = DeepSpeedEngine.get_optimizer_configuration(None, params, True)  # type: ignore[arg-type]
    assert cls is torch.optim.AdamW and "torch_adam" not in params
    # torch's fused AdamW also runs on the CPU (torch >= 2.4), so the exact object can be built here.
    opt = cls([torch.nn.Parameter(torch.ones(3))], **params, **kwargs)
    assert opt.defaults["fused"] is True
