"""The retrieval model: id-aware ITC targets, same-image-free hard negatives, idx queue, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from albef_testutils import assert_close, assert_rel, oracle_config

from model import ALBEFConfig, build_albef
from model.convert import to_official
from model.retrieval import (
    EMPTY_IDX,
    build_retrieval,
    itc_loss_with_ids,
    load_retrieval_state,
    sample_hard_negatives_by_id,
)


def _oracle_retrieval(oracle_dir: Path):
    model = build_retrieval(oracle_config(oracle_dir))
    load_retrieval_state(model, torch.load(oracle_dir / "albef_state.pth", weights_only=True))
    return model.eval()


def test_distinct_ids_reproduce_the_official_pretraining_losses(oracle_dir: Path, oracle_outputs: dict) -> None:
    """All ids distinct and an empty idx queue = the pretraining ITC; ITM is the same network."""
    o, f = oracle_outputs, oracle_outputs["forward"]
    model = _oracle_retrieval(oracle_dir)
    model.momentum_update()  # the official forward starts with the EMA
    with torch.no_grad():
        out = model(
            o["image"],
            o["input_ids"],
            o["attention_mask"],
            torch.arange(4) + 10,
            o["alpha"],
            neg_image_idx=f["neg_image_idx"],
            neg_text_idx=f["neg_text_idx"],
        )
    assert_rel("loss_ita", out.itc_loss, f["loss_ita"])
    assert_rel("loss_itm", out.itm_loss, f["loss_itm"])
    assert torch.equal(out.loss, out.itc_loss + out.itm_loss)


def test_same_image_targets_match_the_official_formula(oracle_outputs: dict) -> None:
    """Official model_retrieval.py ITC, written out on the official features, vs ours."""
    o, alpha, temp = oracle_outputs, 0.4, oracle_outputs["temp"]
    idx = torch.tensor([7, 3, 7, 5])
    idx_queue = torch.full((1, 16), EMPTY_IDX)
    idx_queue[0, [0, 5]] = torch.tensor([3, 7])  # queue column 0 shares image 3, column 5 image 7
    ours = itc_loss_with_ids(
        o["image_feat"],
        o["text_feat"],
        o["image_feat_m"],
        o["text_feat_m"],
        o["image_queue"],
        o["text_queue"],
        idx,
        idx_queue,
        temp,
        alpha,
    )
    # official: idx_all = cat([idx.t(), idx_queue]); pos = eq(idx, idx_all); targets = pos / pos.sum(1)
    pos = torch.eq(idx.view(-1, 1), torch.cat([idx.view(1, -1), idx_queue], dim=1)).float()
    sim_targets = pos / pos.sum(1, keepdim=True)
    text_all = torch.cat([o["text_feat_m"].t(), o["text_queue"]], dim=1)
    image_all = torch.cat([o["image_feat_m"].t(), o["image_queue"]], dim=1)
    i2t_t = alpha * F.softmax(o["image_feat_m"] @ text_all / temp, 1) + (1 - alpha) * sim_targets
    t2i_t = alpha * F.softmax(o["text_feat_m"] @ image_all / temp, 1) + (1 - alpha) * sim_targets
    loss_i2t = -torch.sum(F.log_softmax(o["image_feat"] @ text_all / temp, 1) * i2t_t, 1).mean()
    loss_t2i = -torch.sum(F.log_softmax(o["text_feat"] @ image_all / temp, 1) * t2i_t, 1).mean()
    assert_rel("itc", ours.itc_loss, (loss_i2t + loss_t2i) / 2)
    assert pos[0, [0, 2, 4 + 5]].tolist() == [1, 1, 1] and pos[0].sum() == 3  # rows see queue positives


def test_hard_negatives_never_share_the_image() -> None:
    idx = torch.tensor([1, 1, 2, 2, 3, 4])
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(6, 6 + 8, generator=g) * 5
    for _ in range(50):
        neg_img, neg_txt = sample_hard_negatives_by_id(sims, sims.flip(0), idx, g)
        assert (idx[neg_img] != idx).all() and (idx[neg_txt] != idx).all()
    # a batch of one image: fall back to "not the diagonal" rather than NaN or a crash
    neg_img, neg_txt = sample_hard_negatives_by_id(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([9, 9]))
    assert neg_img.tolist() == [1, 0] and neg_txt.tolist() == [1, 0]


def test_gradients_enqueue_and_no_mlm_head() -> None:
    cfg = ALBEFConfig.tiny(image_size=32, queue_size=8)
    model = build_retrieval(cfg).train()
    assert not any(".cls." in k for k in model.state_dict()), "retrieval model must not carry the MLM head"
    image, ids = torch.randn(4, 3, 32, 32), torch.randint(1000, 2000, (4, 7))
    out = model(image, ids, torch.ones_like(ids), torch.tensor([3, 3, 8, 9]), 0.4)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    assert not model.image_queue.requires_grad and not model.idx_queue.requires_grad
    assert torch.equal(model.idx_queue, torch.full((1, 8), EMPTY_IDX)), "forward must not touch the queues"
    model.enqueue(out.image_feat_m, out.text_feat_m, out.idx)
    model.enqueue(out.image_feat_m, out.text_feat_m, out.idx + 100)
    assert model.idx_queue.tolist() == [[3, 3, 8, 9, 103, 103, 108, 109]]
    assert int(model.queue_ptr) == 0  # wrapped
    with pytest.raises(ValueError, match="image ids"):
        model.enqueue(out.image_feat_m, out.text_feat_m, out.idx[:2])


def test_cls_only_last_layer_matches_full_itm(oracle_dir: Path, oracle_outputs: dict) -> None:
    o = oracle_outputs
    model = _oracle_retrieval(oracle_dir)
    with torch.no_grad():
        embeds, _ = model.encode_image(o["image"])
        text_embeds, _ = model.encode_text(o["input_ids"], o["attention_mask"])
        fast = model.itm_logits_cls(text_embeds, o["attention_mask"], embeds)
    assert_close("itm_logits_pos", fast, o["itm_logits_pos"], atol=1e-5)  # the official numbers


def test_loads_our_pretraining_checkpoint_at_another_resolution() -> None:
    pre = build_albef(ALBEFConfig.tiny(image_size=32)).eval()
    cfg = ALBEFConfig.tiny(image_size=48)
    model = build_retrieval(cfg).eval()
    report = load_retrieval_state(model, {"model": pre.state_dict()})
    assert set(report.interpolated) == {"visual_encoder.pos_embed", "visual_encoder_m.pos_embed"}
    assert any(k.startswith("text_encoder.cls.") for k in report.skipped)
    assert torch.equal(
        model.text_encoder.encoder.layer[3].crossattention.self.query.weight,
        pre.text_encoder.encoder.layer[3].crossattention.self.query.weight,
    )
    assert torch.equal(model.text_queue, pre.text_queue) and (model.idx_queue == EMPTY_IDX).all()
    ids = torch.randint(1000, 2000, (2, 6))
    with torch.no_grad():
        t_ours, t_pre = model.encode_text(ids, torch.ones_like(ids)), pre.encode_text(ids, torch.ones_like(ids))
        img = torch.randn(2, 5, 64)
        assert torch.equal(
            model.itm_logits(t_ours[0], torch.ones_like(ids), img), pre.itm_logits(t_pre[0], torch.ones_like(ids), img)
        )


def test_official_layouts_pretrain_and_finetuned(oracle_dir: Path, oracle_outputs: dict) -> None:
    o = oracle_outputs
    model = _oracle_retrieval(oracle_dir)
    with torch.no_grad():
        embeds, feat = model.encode_image(o["image"])
        text_embeds, _ = model.encode_text(o["input_ids"], o["attention_mask"])
        assert_close("image_feat", feat, o["image_feat"])
        assert_close("itm_logits_pos", model.itm_logits(text_embeds, o["attention_mask"], embeds), o["itm_logits_pos"])
    # the official fine-tuned layout: `text_encoder.*` without `bert.`, no MLM head, plus idx_queue
    official = torch.load(oracle_dir / "albef_state.pth", weights_only=True)
    finetuned = {k.replace(".bert.", "."): v for k, v in official.items() if ".cls." not in k}
    finetuned["idx_queue"] = torch.arange(16).view(1, 16)
    fresh = build_retrieval(oracle_config(oracle_dir)).eval()
    report = load_retrieval_state(fresh, {"model": finetuned})
    assert ("idx_queue", "idx_queue") in report.mapped
    assert torch.equal(fresh.idx_queue, torch.arange(16).view(1, 16))
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        if name != "idx_queue":
            assert torch.equal(a, b), name
    # ours -> official pretrain layout -> back: identical
    again = build_retrieval(oracle_config(oracle_dir))
    load_retrieval_state(again, to_official(model.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_mismatched_checkpoint_fails_loudly(oracle_dir: Path) -> None:
    official = torch.load(oracle_dir / "albef_state.pth", weights_only=True)
    broken = {k: v for k, v in official.items() if not k.startswith("itm_head.")}
    with pytest.raises(ValueError, match="itm_head"):
        load_retrieval_state(build_retrieval(oracle_config(oracle_dir)), broken)
    with pytest.raises(ValueError, match="unknown_key|does not know"):
        load_retrieval_state(build_retrieval(oracle_config(oracle_dir)), {**official, "unknown_key": torch.zeros(1)})
