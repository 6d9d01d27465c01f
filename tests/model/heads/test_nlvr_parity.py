"""NLVR2 (two-image encoder with duplicated fusion layers and shared cross-attention K/V) and its
text-assignment pretraining vs the official `model_nlvr.py` / `model_pretrain_nlvr.py`."""

from __future__ import annotations

import pytest
import torch

from model.heads.convert import official_task_keys
from model.heads.nlvr import (
    ALBEFNLVR,
    TA_LABELS,
    ALBEFTextAssignment,
    TAConfig,
    build_nlvr,
    build_text_assignment,
    layer_images,
    load_nlvr_state,
    load_text_assignment_state,
    nlvr_text_config,
    pair_hidden_states,
    sample_text_assignment,
)
from model.heads.ve import ClassifierConfig

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
        num_classes=fx.key_shapes()["cls_head.2.weight"][0],
        distill=fx.meta["albef_config"]["distill"],
    )


def _nlvr(fx: TaskFixture) -> ALBEFNLVR:
    model = build_nlvr(_config(fx))
    report = load_nlvr_state(model, fx.state)
    assert not report.missing and not report.unexpected, report.summary()
    return model.eval()


def _ta(fx: TaskFixture) -> ALBEFTextAssignment:
    model = build_text_assignment(TAConfig(backbone=fx.backbone))
    report = load_text_assignment_state(model, fx.state)
    assert not report.missing and not report.unexpected, report.summary()
    assert set(report.skipped) == {"temp", "text_proj.weight", "text_proj.bias", "text_encoder.embeddings.position_ids"}
    return model.eval()


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return abs(float(ours) - float(ref)) / abs(float(ref))


@pytest.mark.parametrize("task", ["nlvr", "nlvr_ta"])
def test_encoder_layout_is_the_official_one(request: pytest.FixtureRequest, task: str) -> None:
    fx: TaskFixture = request.getfixturevalue(f"{task}_fx")
    text = nlvr_text_config(fx.backbone.text)
    assert (text.num_layers, text.fusion_layer) == (
        fx.meta["nlvr_bert_config"]["num_hidden_layers"],
        fx.meta["nlvr_bert_config"]["fusion_layer"],
    )
    model = _nlvr(fx) if task == "nlvr" else _ta(fx)
    sd = model.state_dict()
    for a, b in fx.meta["tied_state_keys"]:  # one tensor in our model, as the official Parameter sharing
        assert sd[a].data_ptr() == sd[b].data_ptr(), (a, b)
    official = {k for k in fx.state if not k.endswith("position_ids")}
    dropped = {"temp", "text_proj.weight", "text_proj.bias"} if task == "nlvr_ta" else set()
    assert set(sd) == official - dropped
    for key in set(sd):
        assert torch.equal(sd[key], fx.state[key]), key


def test_official_layer_images(nlvr_fx: TaskFixture) -> None:
    assert layer_images(nlvr_fx.backbone.text) == nlvr_fx.outputs["layer_image"]


@torch.no_grad()
def test_nlvr_deterministic_outputs(nlvr_fx: TaskFixture) -> None:
    o, i, m = nlvr_fx.outputs, nlvr_fx.outputs["inputs"], _nlvr(nlvr_fx)
    images = torch.cat([i["image0"], i["image1"]])
    ids, mask, b = o["input_ids"], o["attention_mask"], o["input_ids"].shape[0]
    image_embeds = m.visual_encoder(images)
    assert max_diff(image_embeds, o["image_embeds"]) <= ATOL
    states = pair_hidden_states(m.text_encoder, ids, mask, image_embeds[:b], image_embeds[b:])
    assert max_diff(torch.stack(states), o["hidden_states"]) <= ATOL
    assert max_diff(states[-1], o["multimodal_hidden"]) <= ATOL
    logits = m.logits(images, ids, mask)
    assert max_diff(logits, o["logits"]) <= ATOL
    assert max_diff(logits, o["logits_eval_forward"]) <= ATOL
    assert max_diff(m.logits_m(images, ids, mask), o["logits_m"]) <= ATOL
    assert _rel(m(images, ids, mask, i["targets"], 0.0).loss, o["loss_ce"]) <= RTOL
    assert _rel(m(images, ids, mask, i["targets"], i["alpha"]).loss, o["loss_pre_update"]) <= RTOL


def test_nlvr_training_forward(nlvr_fx: TaskFixture) -> None:
    o, i, m = nlvr_fx.outputs, nlvr_fx.outputs["inputs"], _nlvr(nlvr_fx)
    f = o["forward"]
    m.momentum_update()
    twins, sources = m._ema_lists()
    assert max((t - s).abs().max().item() for t, s in zip(twins, sources)) == f["momentum_max_abs_diff_after"]
    with torch.no_grad():
        out = m(torch.cat([i["image0"], i["image1"]]), o["input_ids"], o["attention_mask"], i["targets"], i["alpha"])
    assert _rel(out.loss, f["loss"]) <= RTOL
    assert out.logits_m is not None and max_diff(out.logits_m, f["logits_m"]) <= ATOL


def test_nlvr_shared_projections_get_one_gradient(nlvr_fx: TaskFixture) -> None:
    o, i, m = nlvr_fx.outputs, nlvr_fx.outputs["inputs"], _nlvr(nlvr_fx)
    m.train()
    out = m(torch.cat([i["image0"], i["image1"]]), o["input_ids"], o["attention_mask"], i["targets"], i["alpha"])
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    layers = m.text_encoder.encoder.layer
    f = m.text_encoder.config.fusion_layer
    assert layers[f].crossattention.self.key is layers[f + 1].crossattention.self.key
    assert layers[f].crossattention.self.query is not layers[f + 1].crossattention.self.query
    # the teacher's twin keeps the sharing: one EMA step moves both keys of a pair together
    twin_layers = m.text_encoder_m.encoder.layer
    assert twin_layers[f].crossattention.self.key is twin_layers[f + 1].crossattention.self.key


@torch.no_grad()
def test_text_assignment_weights_and_draws(nlvr_ta_fx: TaskFixture) -> None:
    o, i, m = nlvr_ta_fx.outputs, nlvr_ta_fx.outputs["inputs"], _ta(nlvr_ta_fx)
    f = o["forward"]
    image_embeds = m.visual_encoder(i["image"])
    assert max_diff(image_embeds, o["image_embeds"]) <= ATOL
    assert max_diff(torch.nn.functional.normalize(m.vision_proj(image_embeds[:, 0]), dim=-1), o["image_feat"]) <= ATOL
    assert max_diff(m.assignment_similarity(image_embeds), o["sim"]) <= ATOL
    weights = m.assignment_weights(image_embeds)
    assert max_diff(weights, o["weights"]) <= ATOL
    torch.manual_seed(f["seed"])  # nothing draws before the pairs: the visual encoder runs in eval mode
    image0, image1, labels = sample_text_assignment(weights)
    assert torch.equal(image0, f["image0_idx"]) and torch.equal(image1, f["image1_idx"])
    assert torch.equal(labels, f["labels"])
    assert sorted(set(labels.tolist())) == sorted(TA_LABELS.values())  # the fixture's seed draws all three


def test_text_assignment_forward(nlvr_ta_fx: TaskFixture) -> None:
    o, i, m = nlvr_ta_fx.outputs, nlvr_ta_fx.outputs["inputs"], _ta(nlvr_ta_fx)
    f = o["forward"]
    torch.manual_seed(f["seed"])
    with torch.no_grad():
        out = m(i["image"], o["input_ids"], o["attention_mask"])
    assert torch.equal(out.labels, f["labels"]) and torch.equal(out.image0_idx, f["image0_idx"])
    assert max_diff(out.logits, f["ta_logits"]) <= ATOL
    assert max_diff(out.logits, f["ta_logits_replayed"]) <= ATOL
    assert _rel(out.loss, f["loss"]) <= RTOL and _rel(out.loss, f["loss_replayed"]) <= RTOL
    m.train()
    out = m(
        i["image"],
        o["input_ids"],
        o["attention_mask"],
        image0_idx=f["image0_idx"],
        image1_idx=f["image1_idx"],
        labels=f["labels"],
    )
    out.loss.backward()
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(m.get_parameter(n).grad is not None for n in trained)
    assert not any(n.startswith("vision_proj") for n in trained)  # never trained, as in the official model


@pytest.mark.parametrize("depth", ["tiny", "full_depth"])
def test_pretrain_nlvr_key_loop(nlvr_ta_fx: TaskFixture, depth: str) -> None:
    remap = nlvr_ta_fx.remap[depth]
    cfg = nlvr_ta_fx.backbone if depth == "tiny" else type(nlvr_ta_fx.backbone).base()
    names = official_task_keys(official_pretrained_keys(cfg), "nlvr_ta", fusion_layer=cfg.text.fusion_layer)
    task_keys = set(remap["loaded"]) | set(remap["missing_keys"])
    if depth == "tiny":
        assert task_keys == set(nlvr_ta_fx.key_shapes())
    assert {k: v for k, v in names.items() if k in task_keys} == remap["loaded"]
    assert sorted(task_keys - set(names)) == sorted(remap["missing_keys"])
    assert sorted(set(names) - task_keys) == sorted(remap["unexpected_keys"])


def test_pretrained_import_duplicates_fusion_layers(nlvr_ta_fx: TaskFixture) -> None:
    cfg = nlvr_ta_fx.backbone
    pretrained = random_official_pretrained(cfg)
    model = build_text_assignment(TAConfig(backbone=cfg))
    report = load_text_assignment_state(model, pretrained)
    assert_import_follows_loop(
        official_task_keys(pretrained, "nlvr_ta", fusion_layer=cfg.text.fusion_layer), report.mapped
    )
    assert report.missing == ["ta_head.bias", "ta_head.weight"]
    f = cfg.text.fusion_layer
    src = pretrained[f"text_encoder.bert.encoder.layer.{f}.crossattention.self.query.weight"]
    for layer in (f, f + 1):
        assert torch.equal(model.text_encoder.encoder.layer[layer].crossattention.self.query.weight, src)


@pytest.mark.parametrize("teacher_from_checkpoint", [True, False])
def test_nlvr_from_text_assignment_checkpoint(
    nlvr_fx: TaskFixture, nlvr_ta_fx: TaskFixture, teacher_from_checkpoint: bool
) -> None:
    """NLVR.py's import of the TA checkpoint: the official keys (`nlvr_remap.json`), and the teacher
    quirk: the official code leaves the teacher at its init (option False); our default copies it."""
    remap = nlvr_fx.remap["tiny"]
    names = official_task_keys(nlvr_ta_fx.state, "nlvr", fusion_layer=nlvr_fx.backbone.text.fusion_layer)
    task_keys = set(nlvr_fx.key_shapes())
    assert {k: v for k, v in names.items() if k in task_keys} == remap["loaded"]
    assert sorted(task_keys - set(names)) == sorted(remap["missing_keys"])
    assert sorted(set(names) - task_keys) == sorted(remap["unexpected_keys"])
    model = build_nlvr(_config(nlvr_fx))
    init_twin = model.text_encoder_m.encoder.layer[0].attention.self.query.weight.clone()
    report = load_nlvr_state(model, nlvr_ta_fx.state, teacher_from_checkpoint=teacher_from_checkpoint)
    assert_import_follows_loop(names, report.mapped)
    assert sorted(report.unexpected) == sorted(remap["unexpected_keys"])
    loaded = nlvr_ta_fx.state["text_encoder.encoder.layer.0.attention.self.query.weight"]
    twin = model.text_encoder_m.encoder.layer[0].attention.self.query.weight
    assert torch.equal(twin, loaded if teacher_from_checkpoint else init_twin)


def test_nlvr_rejects_a_pretraining_checkpoint(nlvr_fx: TaskFixture) -> None:
    with pytest.raises(ValueError, match="text-assignment"):
        load_nlvr_state(build_nlvr(_config(nlvr_fx)), random_official_pretrained(nlvr_fx.backbone))
