"""Weight init of fresh encoders: BERT/timm by default (ALBEF-base), fan-in in the tiny preset (issue 11)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import model.text
from model import ALBEFConfig, ModelConfigError, TextConfig, VisionConfig, build_albef
from model.text import build_text_encoder
from model.vision import build_vision_encoder


def _linear_stds(module: nn.Module) -> list[tuple[int, float]]:
    return [(m.in_features, m.weight.std().item()) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda: VisionConfig(weight_init="bert"), "vision.weight_init"),
        (lambda: TextConfig(weight_init="timm"), "text.weight_init"),
        (lambda: TextConfig(initializer_range=0.0), "text.initializer_range"),
        (lambda: TextConfig(initializer_range=1), "text.initializer_range"),
    ],
)
def test_bad_init_values_name_the_field(build, path: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        build()
    assert info.value.field == path


def test_tiny_preset_is_patch8_and_fan_in() -> None:
    cfg = ALBEFConfig.tiny(image_size=64)
    assert cfg.vision.patch_size == 8 and cfg.vision.grid_size == 8
    assert cfg.vision.weight_init == "fan_in" and cfg.text.weight_init == "fan_in"
    base = ALBEFConfig.base()
    assert base.vision.patch_size == 16 and base.vision.weight_init == "timm"
    assert base.text.weight_init == "bert" and base.text.initializer_range == 0.02


def test_default_text_init_is_hf_bert_and_unchanged(monkeypatch) -> None:
    """Default: the very draws of the historical hard-coded HF BERT init (N(0, 0.02) weights, zero
    biases, zero [PAD] row), so ALBEF-base's init and RNG stream are unchanged."""
    cfg = TextConfig(vocab_size=500, hidden_size=64, num_heads=2, intermediate_size=128, num_layers=4,
                     fusion_layer=2, encoder_width=64)  # fmt: skip
    torch.manual_seed(0)
    enc = build_text_encoder(cfg)

    def historical(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    monkeypatch.setattr(model.text, "bert_weight_init", lambda config: historical)
    torch.manual_seed(0)
    ref = build_text_encoder(cfg)
    for (name, a), b in zip(enc.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for in_features, std in _linear_stds(enc):
        assert abs(std - 0.02) < 0.003, (in_features, std)


def test_initializer_range_sets_the_bert_std() -> None:
    cfg = TextConfig(vocab_size=500, hidden_size=64, num_heads=2, intermediate_size=128, num_layers=2,
                     fusion_layer=1, encoder_width=64, initializer_range=0.05)  # fmt: skip
    enc = build_text_encoder(cfg)
    assert abs(enc.embeddings.word_embeddings.weight.std().item() - 0.05) < 0.003
    for _, std in _linear_stds(enc):
        assert abs(std - 0.05) < 0.008


def test_fan_in_init_scales_with_the_input_width() -> None:
    torch.manual_seed(0)
    cfg = ALBEFConfig.tiny(image_size=32)
    text = build_text_encoder(cfg.text)
    vision = build_vision_encoder(cfg.vision)
    for module in (text, vision):
        stds = _linear_stds(module)
        assert {fan for fan, _ in stds} >= {64, 128} or {fan for fan, _ in stds} >= {64, 256}
        for fan, std in stds:
            assert abs(std - fan**-0.5) < 0.15 * fan**-0.5, (type(module).__name__, fan, std)
    for m in list(text.modules()) + list(vision.modules()):
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert torch.all(m.bias == 0)
    # embeddings keep the BERT std (initializer_range): only Linear weights follow the fan-in
    assert abs(text.embeddings.word_embeddings.weight.std().item() - 0.02) < 0.002


def test_momentum_twins_start_equal_to_fan_in_weights() -> None:
    model = build_albef(ALBEFConfig.tiny(image_size=32))
    for name, twin in (("visual_encoder", "visual_encoder_m"), ("text_encoder", "text_encoder_m")):
        src = dict(getattr(model, name).named_parameters())
        buffers = dict(getattr(model, twin).named_buffers())
        for key, param in src.items():
            assert torch.equal(param.detach(), buffers[key]), (name, key)


@torch.no_grad()
def test_fan_in_keeps_fresh_text_features_apart() -> None:
    """The collapse the fan-in init removes: with BERT's std 0.02 at width 64 every sentence's [CLS]
    is nearly the same vector; with fan-in the sentences stay distinguishable."""

    def mean_cosine(cfg: ALBEFConfig) -> float:
        torch.manual_seed(0)
        model = build_albef(cfg).eval()
        ids = torch.randint(1000, 2000, (16, 12))
        ids[:, 0] = 101
        _, feat = model.encode_text(ids, torch.ones_like(ids))
        gram = feat @ feat.t()
        return ((gram.sum() - gram.diag().sum()) / (16 * 15)).item()

    tiny = ALBEFConfig.tiny(image_size=32)
    bert = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, weight_init="bert"))
    collapsed, spread = 1 - mean_cosine(bert), 1 - mean_cosine(tiny)  # measured: 4e-5 vs 0.08
    assert collapsed < 1e-3 and spread > 0.02, (collapsed, spread)
