"""Config validation, constructors and the official-config reader."""

from __future__ import annotations

import json

import pytest
import torch

from model import ALBEFConfig, ModelConfigError, TextConfig, VisionConfig, build_albef, config_from_official


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda: VisionConfig(image_size=250), "vision.image_size"),
        (lambda: VisionConfig(width=100, num_heads=12), "vision.width"),
        (lambda: VisionConfig(depth=0), "vision.depth"),
        (lambda: TextConfig(fusion_layer=12), "text.fusion_layer"),
        (lambda: TextConfig(hidden_dropout=1.5), "text.hidden_dropout"),
        (lambda: TextConfig(hidden_act="relu"), "text.hidden_act"),
        (lambda: ALBEFConfig(momentum=1.0), "momentum"),
        (lambda: ALBEFConfig(temp=0.9), "temp"),
        (lambda: ALBEFConfig(queue_size=0), "queue_size"),
        (lambda: ALBEFConfig(text=TextConfig(encoder_width=512)), "text.encoder_width"),
    ],
)
def test_bad_values_name_the_field(build, path: str) -> None:
    """The message names the class and field; `.field` is the attribute path from ALBEFConfig."""
    name = path.rsplit(".", 1)[-1]
    with pytest.raises(ModelConfigError, match=rf"Config\.(text\.)?{name}=") as info:
        build()
    assert isinstance(info.value, ValueError)
    assert info.value.field == path
    config = ALBEFConfig()
    for part in path.split("."):  # the path resolves on a real config
        config = getattr(config, part)


def test_to_dict_round_trips() -> None:
    cfg = ALBEFConfig.tiny(queue_size=128)
    d = cfg.to_dict()
    again = ALBEFConfig(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)
    assert again == cfg


def test_base_is_the_paper_model() -> None:
    with torch.device("meta"):  # sizes only, nothing allocated
        model = build_albef(ALBEFConfig.base())
    trainable = sum(p.numel() for p in model.parameters())
    assert 205e6 < trainable < 215e6, trainable  # ALBEF-base: ~210M trainable parameters
    assert model.visual_encoder.pos_embed.shape == (1, 257, 768)  # 256 px / 16 = 16x16 patches + CLS
    assert len(model.text_encoder.encoder.layer) == 12
    assert [layer.crossattention is not None for layer in model.text_encoder.encoder.layer] == [False] * 6 + [True] * 6


def test_config_from_official_fixture(oracle_dir) -> None:
    meta = json.loads((oracle_dir / "albef_meta.json").read_text())
    bert = json.loads((oracle_dir / "bert_config.json").read_text())
    cfg = config_from_official(meta["albef_config"], bert, meta.get("vit_overrides"))
    assert cfg.vision.image_size == meta["albef_config"]["image_res"]
    assert cfg.text.hidden_size == bert["hidden_size"] and cfg.text.fusion_layer == bert["fusion_layer"]
    assert cfg.embed_dim == meta["albef_config"]["embed_dim"] and cfg.queue_size == meta["albef_config"]["queue_size"]
    vit_b = config_from_official(meta["albef_config"] | {"vision_width": 768}, bert | {"encoder_width": 768}, {})
    assert (vit_b.vision.width, vit_b.vision.depth, vit_b.vision.num_heads) == (768, 12, 12)
    with pytest.raises(ValueError, match="vision_width"):
        config_from_official(meta["albef_config"] | {"vision_width": 768}, bert, meta.get("vit_overrides"))
