"""Parity with the official ALBEF code: every tensor of the fixture's albef_outputs.pt, fp32, <= 1e-5.

The fixture directory comes from ALBEF_ORACLE_DIR (default: the shared tiny fixture), so the same test
runs against a fixture of another size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.losses import mlm_loss
from model.masking import apply_mask_draws

from albef_testutils import assert_close, assert_rel, load_oracle_model

MASK_TOKEN_ID = 103

# every key of albef_outputs.pt and the test that checks it (the completeness test below keeps this honest)
CHECKED = {
    "captions",
    "image",
    "input_ids",
    "attention_mask",
    "mlm_input_ids",
    "mlm_labels",
    "alpha",  # inputs
    "temp",
    "image_embeds",
    "image_feat",
    "text_embeds",
    "text_feat",
    "sim_i2t",
    "sim_t2i",
    "image_embeds_m",
    "image_feat_m",
    "text_feat_m",
    "image_queue",
    "text_queue",
    "sim_i2t_queue",
    "sim_t2i_queue",
    "fusion_pos_hidden",
    "itm_logits_pos",
    "itm_neg_text_index",
    "fusion_neg_hidden",
    "itm_logits_neg",
    "mlm_logits",
    "mlm_logits_m",
    "mlm_loss_hard",
    "mlm_loss_distill",
    "mlm_text_mode_hidden",
    "forward",
}


def test_every_fixture_key_is_checked(oracle_outputs: dict) -> None:
    assert set(oracle_outputs) == CHECKED, f"unchecked keys: {set(oracle_outputs) - CHECKED}"


@torch.no_grad()
def test_unimodal_features_and_similarities(oracle_model, oracle_outputs: dict) -> None:
    o, m = oracle_outputs, oracle_model
    assert_close("temp", m.clamped_temp(), o["temp"])
    image_embeds, image_feat = m.encode_image(o["image"])
    text_embeds, text_feat = m.encode_text(o["input_ids"], o["attention_mask"])
    assert_close("image_embeds", image_embeds, o["image_embeds"])
    assert_close("image_feat", image_feat, o["image_feat"])
    assert_close("text_embeds", text_embeds, o["text_embeds"])
    assert_close("text_feat", text_feat, o["text_feat"])
    temp = m.clamped_temp()
    assert_close("sim_i2t", image_feat @ text_feat.t() / temp, o["sim_i2t"])
    assert_close("sim_t2i", text_feat @ image_feat.t() / temp, o["sim_t2i"])


@torch.no_grad()
def test_momentum_features_and_queues(oracle_model, oracle_outputs: dict) -> None:
    o, m = oracle_outputs, oracle_model
    image_embeds_m, image_feat_m = m.encode_image_m(o["image"])
    _, text_feat_m = m.encode_text_m(o["input_ids"], o["attention_mask"])
    assert_close("image_embeds_m", image_embeds_m, o["image_embeds_m"])
    assert_close("image_feat_m", image_feat_m, o["image_feat_m"])
    assert_close("text_feat_m", text_feat_m, o["text_feat_m"])
    assert_close("image_queue", m.image_queue, o["image_queue"], atol=0.0)
    assert_close("text_queue", m.text_queue, o["text_queue"], atol=0.0)
    _, image_feat = m.encode_image(o["image"])
    _, text_feat = m.encode_text(o["input_ids"], o["attention_mask"])
    temp = m.clamped_temp()
    text_all = torch.cat([text_feat_m.t(), m.text_queue], dim=1)
    image_all = torch.cat([image_feat_m.t(), m.image_queue], dim=1)
    assert_close("sim_i2t_queue", image_feat @ text_all / temp, o["sim_i2t_queue"])
    assert_close("sim_t2i_queue", text_feat @ image_all / temp, o["sim_t2i_queue"])


@torch.no_grad()
def test_fusion_and_itm(oracle_model, oracle_outputs: dict) -> None:
    o, m = oracle_outputs, oracle_model
    text_embeds, mask = o["text_embeds"], o["attention_mask"]
    image_embeds, _ = m.encode_image(o["image"])
    assert_close("fusion_pos_hidden", m.fuse(text_embeds, mask, image_embeds), o["fusion_pos_hidden"])
    assert_close("itm_logits_pos", m.itm_logits(text_embeds, mask, image_embeds), o["itm_logits_pos"])
    neg = o["itm_neg_text_index"]
    assert torch.equal(neg, (torch.arange(len(neg)) + 1) % len(neg))  # as the README documents
    assert_close("fusion_neg_hidden", m.fuse(text_embeds[neg], mask[neg], image_embeds), o["fusion_neg_hidden"])
    assert_close("itm_logits_neg", m.itm_logits(text_embeds[neg], mask[neg], image_embeds), o["itm_logits_neg"])


@torch.no_grad()
def test_mlm_logits_and_losses(oracle_model, oracle_outputs: dict) -> None:
    o, m = oracle_outputs, oracle_model
    ids, mask, labels = o["mlm_input_ids"], o["attention_mask"], o["mlm_labels"]
    image_embeds, _ = m.encode_image(o["image"])
    image_embeds_m, _ = m.encode_image_m(o["image"])
    # all layers + MLM head, cross-attending to the image: what ALBEF._mlm runs (on masked rows only)
    logits = m.text_encoder.mlm_head(m.text_encoder(ids, mask, image_embeds=image_embeds, mode="full"))
    logits_m = m.text_encoder_m.mlm_head(m.text_encoder_m(ids, mask, image_embeds=image_embeds_m, mode="full"))
    assert_close("mlm_logits", logits, o["mlm_logits"])
    assert_close("mlm_logits_m", logits_m, o["mlm_logits_m"])
    assert_close("mlm_text_mode_hidden", m.text_encoder(ids, mask, mode="text"), o["mlm_text_mode_hidden"])
    sel = labels != -100
    assert_rel("mlm_loss_hard", mlm_loss(logits[sel], labels[sel], None, 0.0), o["mlm_loss_hard"])
    assert_rel("mlm_loss_distill", mlm_loss(logits[sel], labels[sel], logits_m[sel], o["alpha"]), o["mlm_loss_distill"])
    # the fixture's masking is a real one: only [MASK] or kept/random ids where labelled, inputs elsewhere
    assert torch.equal(ids[~sel], o["input_ids"][~sel])
    assert torch.equal(labels[sel], o["input_ids"][sel])


def test_masking_replays_recorded_draws(oracle_outputs: dict) -> None:
    f, ids = oracle_outputs["forward"], oracle_outputs["input_ids"]
    masked = f["masked_indices"] & (ids != 0) & (ids != 101)  # the official code un-masks [PAD] and [CLS]
    out, labels = apply_mask_draws(
        ids,
        masked,
        f["indices_replaced_draw"],
        f["indices_random_draw"],
        f["random_words"],
        mask_token_id=MASK_TOKEN_ID,
    )
    assert torch.equal(out, f["mlm_input_ids"])
    assert torch.equal(labels, f["mlm_labels"])


def test_forward_replay_losses_and_queues(oracle_dir, oracle_outputs: dict) -> None:
    """One official training forward: EMA at its start, recorded negatives + masking, then enqueue."""
    o, f = oracle_outputs, oracle_outputs["forward"]
    model = load_oracle_model(oracle_dir)
    model.momentum_update()
    with torch.no_grad():
        out = model(
            o["image"],
            o["input_ids"],
            o["attention_mask"],
            f["mlm_input_ids"],
            f["mlm_labels"],
            o["alpha"],
            neg_image_idx=f["neg_image_idx"],
            neg_text_idx=f["neg_text_idx"],
        )
    assert_rel("loss_ita", out.itc_loss, f["loss_ita"])
    assert_rel("loss_itm", out.itm_loss, f["loss_itm"])
    assert_rel("loss_mlm", out.mlm_loss, f["loss_mlm"])
    for name in ("itc_loss", "itm_loss", "mlm_loss"):
        assert getattr(out, name).dtype == torch.float32
    assert torch.equal(model.queue_ptr, torch.zeros(1, dtype=torch.long)), "forward must not touch the queues"
    assert set(out.queue_update()) == {"image_feat_m", "text_feat_m"}
    model.enqueue(**out.queue_update())  # the trainer's task-independent call (all-gathered there)
    assert_close("image_queue_after", model.image_queue, f["image_queue_after"])
    assert_close("text_queue_after", model.text_queue, f["text_queue_after"])
    assert torch.equal(model.queue_ptr, f["queue_ptr_after"])


@pytest.mark.parametrize("momentum", [False, True])
def test_model_dtype_independent_features_are_fp32(oracle_model, oracle_outputs: dict, momentum: bool) -> None:
    o, m = oracle_outputs, oracle_model
    with torch.no_grad():
        _, feat = (m.encode_image_m if momentum else m.encode_image)(o["image"])
    assert feat.dtype == torch.float32
    assert_close("unit norm", feat.norm(dim=-1), torch.ones(feat.shape[0]), atol=1e-5)
    assert F.normalize(feat, dim=-1).shape == feat.shape
