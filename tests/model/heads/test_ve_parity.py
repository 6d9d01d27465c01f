"""SNLI-VE model vs the official `model_ve.py` (VE.py): every tensor of ve_outputs.pt, the checkpoint
import and VE.py's pre-trained key loop."""

from __future__ import annotations

import pytest
import torch

from model.heads.convert import official_task_keys
from model.heads.ve import ALBEFVE, VE_LABELS, ClassifierConfig, build_ve, load_classifier_state

from heads_testutils import (
    TaskFixture,
    assert_import_follows_loop,
    max_diff,
    official_pretrained_keys,
    random_official_pretrained,
)

ATOL = 1e-5
RTOL = 1e-5


def _config(fx: TaskFixture) -> ClassifierConfig:
    return ClassifierConfig(
        backbone=fx.backbone,
        num_classes=len(fx.outputs["inputs"]["label_map"]),
        distill=fx.meta["albef_config"]["distill"],
    )


def _model(fx: TaskFixture) -> ALBEFVE:
    model = build_ve(_config(fx))
    report = load_classifier_state(model, fx.state, task="ve", builder=build_ve)
    assert not report.missing and not report.unexpected, report.summary()
    return model.eval()


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return abs(float(ours) - float(ref)) / abs(float(ref))


def test_label_map_is_official(ve_fx: TaskFixture) -> None:
    assert VE_LABELS == ve_fx.outputs["inputs"]["label_map"]


def test_official_checkpoint_imports_every_tensor(ve_fx: TaskFixture) -> None:
    model = _model(ve_fx)
    ours = model.state_dict()
    assert len(ours) == len(ve_fx.state) - 2  # the two position_ids buffers are recomputed
    for key, tensor in ve_fx.state.items():
        if not key.endswith("position_ids"):
            assert torch.equal(ours[key], tensor), key


@torch.no_grad()
def test_deterministic_outputs(ve_fx: TaskFixture) -> None:
    o, i, m = ve_fx.outputs, ve_fx.outputs["inputs"], _model(ve_fx)
    ids, mask = o["input_ids"], o["attention_mask"]
    image_embeds = m.visual_encoder(i["image"])
    hidden = m.text_encoder(ids, mask, image_embeds=image_embeds, mode="full")
    assert max_diff(image_embeds, o["image_embeds"]) <= ATOL
    assert max_diff(hidden, o["multimodal_hidden"]) <= ATOL
    logits = m.logits(i["image"], ids, mask)
    assert max_diff(logits, o["logits"]) <= ATOL
    assert max_diff(logits, o["logits_eval_forward"]) <= ATOL
    assert max_diff(m.logits_m(i["image"], ids, mask), o["logits_m"]) <= ATOL
    out = m(i["image"], ids, mask, i["targets"], 0.0)
    assert _rel(out.cls_loss, o["loss_ce"]) <= RTOL
    out = m(i["image"], ids, mask, i["targets"], i["alpha"])
    assert _rel(out.cls_loss, o["loss_pre_update"]) <= RTOL


def test_training_forward(ve_fx: TaskFixture) -> None:
    """The official forward starts with the EMA: our trainer order momentum_update() -> forward."""
    o, i, m = ve_fx.outputs, ve_fx.outputs["inputs"], _model(ve_fx)
    f = o["forward"]
    m.momentum_update()
    twins, sources = m._ema_lists()
    assert max((t - s).abs().max().item() for t, s in zip(twins, sources)) == f["momentum_max_abs_diff_after"]
    torch.manual_seed(i["forward_seed"])
    with torch.no_grad():
        out = m(i["image"], o["input_ids"], o["attention_mask"], i["targets"], i["alpha"])
    assert _rel(out.loss, f["loss"]) <= RTOL
    assert out.logits_m is not None and max_diff(out.logits_m, f["logits_m"]) <= ATOL
    assert set(out.losses()) == {"cls_loss"} and out.cls_loss.dtype == torch.float32


def test_gradients_reach_the_student_only(ve_fx: TaskFixture) -> None:
    o, i, m = ve_fx.outputs, ve_fx.outputs["inputs"], _model(ve_fx)
    m.train()
    out = m(i["image"], o["input_ids"], o["attention_mask"], i["targets"], i["alpha"])
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(not t.training for t in m.momentum_twins())
    assert not any(k.endswith("_m") for k, _ in m.named_parameters())


@pytest.mark.parametrize("depth", ["tiny", "full_depth"])
def test_pretrained_key_loop(ve_fx: TaskFixture, depth: str) -> None:
    remap = ve_fx.remap[depth]
    cfg = ve_fx.backbone if depth == "tiny" else type(ve_fx.backbone).base()
    names = official_task_keys(official_pretrained_keys(cfg), "ve", fusion_layer=cfg.text.fusion_layer)
    task_keys = set(remap["loaded"]) | set(remap["missing_keys"])
    if depth == "tiny":
        assert task_keys == set(ve_fx.key_shapes())
    assert {k: v for k, v in names.items() if k in task_keys} == remap["loaded"]
    assert sorted(task_keys - set(names)) == sorted(remap["missing_keys"])
    assert sorted(set(names) - task_keys) == sorted(remap["unexpected_keys"])


def test_pretrained_import(ve_fx: TaskFixture) -> None:
    """An official pre-trained checkpoint into the VE model: as VE.py, only the head is missing (its
    teacher starts equal to it, as the official copy_params() at construction)."""
    cfg = ve_fx.backbone
    pretrained = random_official_pretrained(cfg)
    names = official_task_keys(pretrained, "ve", fusion_layer=cfg.text.fusion_layer)
    model = build_ve(_config(ve_fx))
    report = load_classifier_state(model, pretrained, task="ve", builder=build_ve)
    assert_import_follows_loop(names, report.mapped)
    assert report.missing == sorted(k for k in ve_fx.remap["tiny"]["missing_keys"])
    sd = model.state_dict()
    assert torch.equal(sd["visual_encoder_m.norm.weight"], pretrained["visual_encoder_m.norm.weight"])
    assert torch.equal(sd["cls_head_m.2.weight"], sd["cls_head.2.weight"])
