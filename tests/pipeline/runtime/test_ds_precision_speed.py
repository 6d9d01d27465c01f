"""The CPU precision choice: `albef_autocast` (fp32 engine, bf16 autocast) vs DeepSpeed's bf16 mode."""

from __future__ import annotations

import json

import pytest

from pipeline.config import REPO_ROOT, ConfigError
from pipeline.runtime.ds_config import precision_of


def _ds(name: str) -> dict:
    return json.loads((REPO_ROOT / "ds_configs" / name).read_text())


def test_cpu_configs_precisions() -> None:
    assert precision_of(_ds("cpu.json")) == "fp32"  # fp32 one flag away
    autocast = _ds("cpu_bf16.json")
    assert precision_of(autocast) == "bf16" and "bf16" not in autocast  # engine stays fp32
    assert precision_of(_ds("cpu_ds_bf16.json")) == "bf16"


def test_tiny_cpu_configs_pick_bf16_autocast() -> None:
    for name in ("pretrain_tiny_cpu.yaml", "retrieval_tiny_cpu.yaml"):
        text = (REPO_ROOT / "pipeline" / "configs" / name).read_text()
        assert "config: ds_configs/cpu_bf16.json" in text, name


@pytest.mark.parametrize("bad", [{"albef_autocast": "fp8"}, {"albef_autocast": "bf16", "fp16": {"enabled": True}}])
def test_bad_autocast_settings_raise(bad: dict) -> None:
    with pytest.raises(ConfigError):
        precision_of(bad)


def test_gpu_smoke_skips_cleanly_without_cuda() -> None:
    import os
    import subprocess

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu_smoke.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SKIPPED" in proc.stdout and "no CUDA device" in proc.stdout


def test_bf16_configs_leave_the_overflow_scan_to_the_trainer() -> None:
    """DeepSpeed's per-gradient inf/NaN scan is ~40% of a bf16 step's kernel launches; the trainer's
    grad-norm check replaces it (tests/pipeline/train/test_trainer.py runs a NaN gradient through it)."""
    for name in ("zero2_bf16.json", "cpu_ds_bf16.json"):
        assert _ds(name)["bf16"] == {"enabled": True, "check_grad_overflow": False}, name
