"""Helpers for the model tests: build our model from the official fixture, tolerance asserts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model import ALBEF, ALBEFConfig, build_albef, config_from_official
from model.convert import from_official


def oracle_config(oracle_dir: Path) -> ALBEFConfig:
    meta = json.loads((oracle_dir / "albef_meta.json").read_text())
    bert = json.loads((oracle_dir / "bert_config.json").read_text())
    return config_from_official(meta["albef_config"], bert, meta.get("vit_overrides"))


def load_oracle_model(oracle_dir: Path) -> ALBEF:
    """Our model built from the fixture's configs with the official state imported, in eval mode (as the oracle)."""
    cfg = oracle_config(oracle_dir)
    model = build_albef(cfg)
    official = torch.load(oracle_dir / "albef_state.pth", weights_only=True)
    sd, report = from_official(official, cfg)
    assert not report.missing and not report.unexpected, report.summary()
    model.load_state_dict(sd, strict=True)
    return model.eval()


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours.detach().double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol}"


def assert_rel(name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    rel = abs(float(ours) - float(ref)) / max(abs(float(ref)), 1e-12)
    assert rel <= rtol, f"{name}: {float(ours)} vs {float(ref)} (relative {rel:.3g} > {rtol})"
