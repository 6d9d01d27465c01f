"""The retrieval model: id-aware ITC targets, same-image-free hard negatives, idx queue, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ALBEF, ALBEFConfig, build_albef
from model.convert import to_official
from model.losses import itc_loss, itm_loss
from model.retrieval import EMPTY_IDX, ALBEFRetrieval, RetrievalOutput, build_retrieval, load_retrieval_state
from model.text import build_text_encoder
from model.vision import build_vision_encoder

from albef_testutils import assert_close, assert_rel, oracle_config


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
    ours = itc_loss(
        o["image_feat"],
        o["text_feat"],
        o["image_feat_m"],
        o["text_feat_m"],
        o["image_queue"],
        o["text_queue"],
        temp,
        alpha,
        idx=idx,
        idx_queue=idx_queue,
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
    assert torch.equal(ours.positives, pos.bool())
    # top-1 accuracy counts a hit on any positive, not only on the diagonal
    rows = torch.arange(4)
    assert_close(
        "itc_acc", ours.itc_acc, (pos[rows, ours.sim_i2t.argmax(1)] + pos[rows, ours.sim_t2i.argmax(1)]).mean() / 2
    )


def test_distinct_ids_and_empty_queue_are_exactly_the_pretraining_itc(oracle_outputs: dict) -> None:
    """One ITC: with no id shared, pos / pos.sum() is the one-hot diagonal bit for bit."""
    o = oracle_outputs
    args = (o["image_feat"], o["text_feat"], o["image_feat_m"], o["text_feat_m"], o["image_queue"], o["text_queue"])
    plain = itc_loss(*args, o["temp"], 0.4)
    with_ids = itc_loss(*args, o["temp"], 0.4, idx=torch.arange(4) + 10, idx_queue=torch.full((1, 16), EMPTY_IDX))
    for name, a, b in zip(plain._fields, plain, with_ids):
        assert torch.equal(a, b), name
    assert torch.equal(plain.positives, torch.eye(4, 4 + 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="both idx and idx_queue"):
        itc_loss(*args, o["temp"], 0.4, idx=torch.arange(4))


def test_forward_negatives_never_share_the_image() -> None:
    """The model passes the same-image mask of its ITC positives to the one sampler."""
    model = build_retrieval(ALBEFConfig.tiny(image_size=32, queue_size=12)).eval()
    image, ids = torch.randn(6, 3, 32, 32), torch.randint(1000, 2000, (6, 7))
    idx = torch.tensor([1, 1, 2, 2, 3, 4])
    with torch.no_grad():
        for seed in range(10):
            out = model(image, ids, torch.ones_like(ids), idx, 0.4, generator=torch.Generator().manual_seed(seed))
            assert (idx[out.neg_image_idx] != idx).all() and (idx[out.neg_text_idx] != idx).all()


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
    assert out.queue_update().keys() == {"image_feat_m", "text_feat_m", "idx"}
    model.enqueue(**out.queue_update())  # the trainer's task-independent call
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


def test_output_methods_split_losses_metrics_and_queue_update() -> None:
    model = build_retrieval(ALBEFConfig.tiny(image_size=32, queue_size=8)).eval()
    ids = torch.randint(1000, 2000, (4, 7))
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32), ids, torch.ones_like(ids), torch.tensor([3, 3, 8, 9]), 0.4)
    assert isinstance(out, RetrievalOutput)
    assert out.losses() == {"itc_loss": out.itc_loss, "itm_loss": out.itm_loss}
    assert torch.equal(out.loss, out.itc_loss + out.itm_loss)
    assert out.metrics() == {"itc_acc": out.itc_acc, "itm_acc": out.itm_acc, "temp": out.temp}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.metrics().values())
    assert out.queue_update() == {"image_feat_m": out.image_feat_m, "text_feat_m": out.text_feat_m, "idx": out.idx}
    assert out.idx.dtype == torch.long


def test_mlm_head_is_required_by_pretraining_and_refused_by_retrieval() -> None:
    cfg = ALBEFConfig.tiny(image_size=32, queue_size=8)
    with pytest.raises(ValueError, match="MLM head"):
        ALBEF(cfg, build_vision_encoder(cfg.vision), build_text_encoder(cfg.text, with_mlm_head=False))
    with pytest.raises(ValueError, match="without MLM head"):
        ALBEFRetrieval(cfg, build_vision_encoder(cfg.vision), build_text_encoder(cfg.text))
    headless = build_text_encoder(cfg.text, with_mlm_head=False)
    with pytest.raises(ValueError, match="without its MLM head"):
        headless.mlm_head(torch.zeros(2, cfg.text.hidden_size))


def test_autocast_keeps_retrieval_similarities_and_losses_fp32() -> None:
    """Under bf16 autocast the ITC similarities, ITC and ITM losses equal an fp32 computation on the
    same features/logits to 1e-5. A bf16 similarity would not: unit features over temp 0.07 give
    |s| up to ~14, and bf16 keeps 8 significant bits, so its error reaches ~14 * 2**-9 ~ 0.03."""
    cfg = ALBEFConfig.tiny(image_size=32, queue_size=8)
    model = build_retrieval(cfg).eval()
    model.enqueue(
        F.normalize(torch.randn(8, cfg.embed_dim), dim=1),
        F.normalize(torch.randn(8, cfg.embed_dim), dim=1),
        torch.arange(8) % 3,
    )
    image, ids = torch.randn(4, 3, 32, 32), torch.randint(1000, 2000, (4, 7))
    mask, idx, alpha = torch.ones_like(ids), torch.tensor([0, 0, 5, 6]), 0.4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, ids, mask, idx, alpha)
        # the same inputs the forward computed (eval mode: deterministic), still under autocast
        image_embeds, image_feat = model.encode_image(image)
        text_embeds, text_feat = model.encode_text(ids, mask)
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[out.neg_text_idx]])
        image_all = torch.cat([image_embeds, image_embeds[out.neg_image_idx], image_embeds])
        itm_logits = model.itm_logits(text_all, torch.cat([mask, mask, mask[out.neg_text_idx]]), image_all)
        itc_args = (image_feat, text_feat, out.image_feat_m, out.text_feat_m, model.image_queue, model.text_queue)
        low = itc_loss(*itc_args, out.temp, alpha, idx=idx, idx_queue=model.idx_queue)
        unguarded_sim = image_feat @ torch.cat([out.text_feat_m.t(), model.text_queue], dim=1) / out.temp
    with torch.no_grad():  # fp32 reference on the same features (they are fp32 already: checked below)
        ref = itc_loss(*itc_args, out.temp, alpha, idx=idx, idx_queue=model.idx_queue)
        ref_itm, _ = itm_loss(itm_logits.float(), num_pos=4)
    assert image_feat.dtype == text_feat.dtype == torch.float32
    assert low.sim_i2t.dtype == low.sim_t2i.dtype == out.itc_loss.dtype == out.itm_loss.dtype == torch.float32
    assert_close("sim_i2t", low.sim_i2t, ref.sim_i2t, atol=1e-5)
    assert_close("sim_t2i", low.sim_t2i, ref.sim_t2i, atol=1e-5)
    assert_rel("itc_loss", out.itc_loss, ref.itc_loss, rtol=1e-5)
    assert_rel("itm_loss", out.itm_loss, ref_itm, rtol=1e-5)
    # the tolerance has teeth: the same product left to autocast runs in bf16 and misses it
    assert unguarded_sim.dtype == torch.bfloat16
    assert (unguarded_sim.float() - ref.sim_i2t).abs().max() > 1e-3
