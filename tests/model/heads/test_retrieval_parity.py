"""Retrieval fine-tuning model and evaluation vs the official `model_retrieval.py` / `Retrieval.py`.

Every tensor of retrieval_outputs.pt: features, ITC with image-id positives, the two training forwards
(hard negatives drawn from the same seeds, queues after), the `evaluation()` score matrices re-ranked
by our pipeline (pipeline/retrieval/rerank.py, exact mode) and the `itm_eval` recalls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.heads.convert import official_task_keys
from model.losses import _positives, itc_loss
from model.retrieval import ALBEFRetrieval, build_retrieval, load_retrieval_state, retrieval_state_dict
from pipeline.retrieval.metrics import retrieval_metrics
from pipeline.retrieval.rerank import EncodedSplit, score_matrices

from heads_testutils import (
    TaskFixture,
    assert_import_follows_loop,
    max_diff,
    official_pretrained_keys,
    random_official_pretrained,
)

ATOL = 1e-5
RTOL = 1e-5


def _model(fx: TaskFixture) -> ALBEFRetrieval:
    model = build_retrieval(fx.backbone)
    report = load_retrieval_state(model, fx.state)
    assert not report.missing and not report.unexpected, report.summary()
    return model.eval()


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return abs(float(ours) - float(ref)) / abs(float(ref))


def test_config_is_the_fixture_size(retrieval_fx: TaskFixture) -> None:
    cfg, sizes = retrieval_fx.backbone, retrieval_fx.meta["sizes"]
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.num_heads) == (
        sizes["vit_width"],
        sizes["vit_depth"],
        sizes["vit_heads"],
    )
    assert (cfg.text.num_layers, cfg.text.fusion_layer) == (
        sizes["text_encoder_num_hidden_layers"],
        sizes["fusion_layer"],
    )
    assert (cfg.embed_dim, cfg.queue_size, cfg.vision.image_size) == (
        sizes["embed_dim"],
        sizes["queue_size"],
        sizes["image_res"],
    )


def test_official_checkpoint_imports_every_tensor(retrieval_fx: TaskFixture) -> None:
    model = _model(retrieval_fx)
    ours = model.state_dict()
    sd, report = retrieval_state_dict(retrieval_fx.state, model.config)
    assert set(report.skipped) == {"text_encoder.embeddings.position_ids", "text_encoder_m.embeddings.position_ids"}
    for src, key in report.mapped:
        assert torch.equal(ours[key], retrieval_fx.state[src]), key
    assert set(ours) == set(sd)


@torch.no_grad()
def test_features_targets_and_itc(retrieval_fx: TaskFixture) -> None:
    o, i, m = retrieval_fx.outputs, retrieval_fx.outputs["inputs"], _model(retrieval_fx)
    ids, mask, alpha = o["input_ids"], o["attention_mask"], i["alpha"]
    assert torch.equal(m.temp.detach(), o["temp"])  # never clamped by model_retrieval; inside our clamp range
    image_embeds, image_feat = m.encode_image(i["image"])
    text_embeds, text_feat = m.encode_text(ids, mask)
    _, image_feat_m = m.encode_image_m(i["image"])
    _, text_feat_m = m.encode_text_m(ids, mask)
    temp = m.clamped_temp()
    for name, ours in (
        ("image_embeds", image_embeds),
        ("image_feat", image_feat),
        ("text_embeds", text_embeds),
        ("text_feat", text_feat),
        ("image_feat_m", image_feat_m),
        ("text_feat_m", text_feat_m),
        ("sim_i2t", image_feat @ text_feat.t() / temp),
        ("sim_t2i", text_feat @ image_feat.t() / temp),
        ("image_queue", m.image_queue),
        ("text_queue", m.text_queue),
    ):
        assert max_diff(ours, o[name]) <= ATOL, name
    assert torch.equal(m.idx_queue, o["idx_queue"]) and torch.equal(m.queue_ptr, o["queue_ptr"])
    itc = itc_loss(
        image_feat, text_feat, image_feat_m, text_feat_m, m.image_queue, m.text_queue, temp, alpha,
        idx=i["idx"], idx_queue=m.idx_queue,
    )  # fmt: skip
    targets = itc.positives.float() / itc.positives.sum(1, keepdim=True)
    assert torch.equal(targets, o["sim_targets"])
    assert max_diff(itc.sim_i2t, o["sim_i2t_queue"]) <= ATOL
    assert max_diff(itc.sim_t2i, o["sim_t2i_queue"]) <= ATOL
    text_all = torch.cat([text_feat_m.t(), m.text_queue], 1)
    image_all = torch.cat([image_feat_m.t(), m.image_queue], 1)
    i2t_targets = alpha * F.softmax(image_feat_m @ text_all / temp, 1) + (1 - alpha) * targets
    t2i_targets = alpha * F.softmax(text_feat_m @ image_all / temp, 1) + (1 - alpha) * targets
    assert max_diff(i2t_targets, o["sim_i2t_targets"]) <= ATOL
    assert max_diff(t2i_targets, o["sim_t2i_targets"]) <= ATOL
    assert _rel(itc.itc_loss, o["itc_loss_pre_update"]) <= RTOL
    assert max_diff(m.fuse(text_embeds, mask, image_embeds), o["fusion_pos_hidden"]) <= ATOL
    assert max_diff(m.itm_logits(text_embeds, mask, image_embeds), o["itm_logits_pos"]) <= ATOL


def test_two_training_forwards_with_queues(retrieval_fx: TaskFixture) -> None:
    """forward1 then forward2 on one model: EMA first, negatives drawn from the official seeds (our
    vectorised sampler consumes the global RNG as the official per-row loop does), then enqueue."""
    i, m = retrieval_fx.outputs["inputs"], _model(retrieval_fx)
    batches = (("forward1", i["image"], i["idx"]), ("forward2", i["image2"], i["idx2"]))
    for name, image, idx in batches:
        f = retrieval_fx.outputs[name]
        m.momentum_update()
        twins, sources = m._ema_lists()
        drift = max((t - s).abs().max().item() for t, s in zip(twins, sources))
        assert drift == f["momentum_max_abs_diff_after"], name
        pos = _positives(len(idx), m.config.queue_size, idx, m.idx_queue, idx.device)
        assert torch.equal(pos.float() / pos.sum(1, keepdim=True), f["sim_targets"]), name
        torch.manual_seed(f["seed"])
        with torch.no_grad():
            out = m(image, f["input_ids"], f["attention_mask"], idx, i["alpha"])
        assert torch.equal(out.neg_image_idx, f["neg_image_idx"]), name
        assert torch.equal(out.neg_text_idx, f["neg_text_idx"]), name
        assert _rel(out.itc_loss, f["loss_ita"]) <= RTOL, name
        assert _rel(out.itm_loss, f["loss_itm"]) <= RTOL, name
        with torch.no_grad():
            image_embeds, _ = m.encode_image(image)
            text_embeds, _ = m.encode_text(f["input_ids"], f["attention_mask"])
            neg_i, neg_t, mask = out.neg_image_idx, out.neg_text_idx, f["attention_mask"]
            logits = m.itm_logits(
                torch.cat([text_embeds, text_embeds, text_embeds[neg_t]]),
                torch.cat([mask, mask, mask[neg_t]]),
                torch.cat([image_embeds, image_embeds[neg_i], image_embeds]),
            )
        assert max_diff(logits, f["itm_logits"]) <= ATOL, name
        m.enqueue(**out.queue_update())
        assert max_diff(m.image_queue, f["image_queue_after"]) <= ATOL, name
        assert max_diff(m.text_queue, f["text_queue_after"]) <= ATOL, name
        assert torch.equal(m.idx_queue, f["idx_queue_after"]) and torch.equal(m.queue_ptr, f["queue_ptr_after"])


@torch.no_grad()
def test_evaluation_scores_and_recalls(retrieval_fx: TaskFixture) -> None:
    """The official evaluation() through our pipeline's re-ranker in exact mode (captions padded to 30)."""
    i, e, m = retrieval_fx.outputs["inputs"], retrieval_fx.outputs["eval"], _model(retrieval_fx)
    image_embeds, image_feat = m.encode_image(i["eval_image"])
    text_hidden, text_feat = m.encode_text(e["input_ids"], e["attention_mask"])
    assert max_diff(image_feat, e["image_embed"]) <= ATOL
    assert max_diff(text_feat, e["text_embed"]) <= ATOL
    enc = EncodedSplit(image_embeds, image_feat, text_hidden, e["attention_mask"], text_feat, float(m.clamped_temp()))
    sims = enc.similarity()
    assert max_diff(sims, e["sims_matrix"]) <= ATOL
    k = i["k_test"]
    assert torch.equal(sims.topk(k, dim=1).indices, e["i2t_topk_idx"])
    assert torch.equal(sims.t().topk(k, dim=1).indices, e["t2i_topk_idx"])
    scores = score_matrices(enc, k, lambda img, txt, mask: m.itm_logits(txt, mask, img), trim_padding=False)
    i2t, t2i = scores["itm"]
    for ours, ref in ((i2t, e["score_matrix_i2t"]), (t2i, e["score_matrix_t2i"])):
        scored = ref != -100  # the official fill value off the top k; ours is -inf
        assert torch.equal(ours != float("-inf"), scored)
        assert max_diff(ours[scored], ref[scored]) <= ATOL
    metrics = retrieval_metrics(i2t, t2i, i["eval_img2txt"], i["eval_txt2img"])
    assert metrics == e["metrics"]


def test_pretrained_checkpoint_key_loop(retrieval_fx: TaskFixture) -> None:
    """Retrieval.py's key loop on a pre-trained checkpoint (tiny and official depth), then our import."""
    remap, fusion = retrieval_fx.remap, retrieval_fx.backbone.text.fusion_layer
    task_keys = set(retrieval_fx.key_shapes())
    names = official_task_keys(official_pretrained_keys(retrieval_fx.backbone), "retrieval", fusion_layer=fusion)
    assert {k: v for k, v in names.items() if k in task_keys} == remap["tiny"]["loaded"]
    assert sorted(task_keys - set(names)) == sorted(remap["tiny"]["missing_keys"])
    assert sorted(set(names) - task_keys) == sorted(remap["tiny"]["unexpected_keys"])
    full = remap["full_depth"]
    base = type(retrieval_fx.backbone).base()
    names = official_task_keys(official_pretrained_keys(base), "retrieval", fusion_layer=base.text.fusion_layer)
    full_keys = set(full["loaded"]) | set(full["missing_keys"])
    assert {k: v for k, v in names.items() if k in full_keys} == full["loaded"]
    assert sorted(set(names) - full_keys) == sorted(full["unexpected_keys"])


def test_pretrained_import_follows_the_key_loop(retrieval_fx: TaskFixture) -> None:
    cfg = retrieval_fx.backbone
    pretrained = random_official_pretrained(cfg)
    names = official_task_keys(pretrained, "retrieval", fusion_layer=cfg.text.fusion_layer)
    sd, report = retrieval_state_dict(pretrained, cfg)
    assert_import_follows_loop(names, report.mapped)
    assert report.missing == retrieval_fx.remap["tiny"]["missing_keys"] == ["idx_queue"]
    model = build_retrieval(cfg)
    load_retrieval_state(model, pretrained)
    assert torch.equal(
        model.text_encoder.encoder.layer[0].attention.self.query.weight,
        sd["text_encoder.encoder.layer.0.attention.self.query.weight"],
    )
