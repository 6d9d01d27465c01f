"""Helpers for the task-model parity tests: read a task folder of the official-code heads fixture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import ALBEFConfig, config_from_official


@dataclass
class TaskFixture:
    """One `<task>/` folder: meta, BERT config, official state dict, outputs, remap, key shapes."""

    task: str
    folder: Path
    meta: dict[str, Any]
    bert: dict[str, Any]
    state: dict[str, torch.Tensor]
    outputs: dict[str, Any]
    remap: dict[str, Any]

    @property
    def backbone(self) -> ALBEFConfig:
        """Encoder sizes from the task's own yaml + BERT config (+ the recorded ViT size shims)."""
        return config_from_official(self.meta["albef_config"], self.bert, self.meta["size_shims"].get("vit_overrides"))

    def key_shapes(self) -> dict[str, tuple[int, ...]]:
        """<task>_keys.txt: official key -> shape."""
        shapes = {}
        for line in (self.folder / f"{self.task}_keys.txt").read_text().splitlines():
            key, shape, _ = line.split("\t")
            shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        return shapes


def load_task_fixture(heads_dir: Path, task: str) -> TaskFixture:
    folder = heads_dir / task

    def read(name: str) -> Any:
        return json.loads((folder / f"{task}_{name}.json").read_text())

    return TaskFixture(
        task=task,
        folder=folder,
        meta=read("meta"),
        bert=read("bert_config"),
        state=torch.load(folder / f"{task}_state.pth", weights_only=True),
        outputs=torch.load(folder / f"{task}_outputs.pt", weights_only=True),
        remap=read("remap"),
    )


def max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    return (ours.detach().double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def official_pretrained_keys(backbone: ALBEFConfig) -> list[str]:
    """Key names of an official pre-trained checkpoint (model_pretrain) of this size, in its order."""
    from model import build_albef
    from model.convert import to_official

    with torch.device("meta"):
        model = build_albef(backbone)
    return list(to_official(model.state_dict()))


def random_official_pretrained(backbone: ALBEFConfig) -> dict[str, torch.Tensor]:
    """A randomly initialised official pre-trained checkpoint (model_pretrain layout) of this size."""
    from model import build_albef
    from model.convert import to_official

    torch.manual_seed(123)
    return to_official(build_albef(backbone).state_dict())


def assert_import_follows_loop(names: dict[str, str], mapped: list[tuple[str, str]]) -> None:
    """Our import (`mapped`: (source key, our key)) takes every tensor from where the official key loop
    (`names`: {official task key: source key}) takes it, and nothing else."""
    from model.heads.convert import to_our_key

    expected = {ours: src for key, src in names.items() if (ours := to_our_key(key)) is not None}
    for src, ours in mapped:
        assert expected.get(ours) == src, f"{ours} <- {src}, the official loop gives {expected.get(ours)}"
