"""VQA model vs the official `model_vqa.py` / `VQA.py`: every tensor of vqa_outputs.pt (question states,
decoder logits, per-token log-probs, answer losses with distillation, answer ranking), the checkpoint
import and VQA.py's key loop that builds the answer decoder from the pre-trained fusion layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.heads.convert import official_task_keys
from model.heads.vqa import ALBEFVQA, VQAConfig, answer_loss, answer_token_logprobs, build_vqa, load_vqa_state

from heads_testutils import (
    TaskFixture,
    assert_import_follows_loop,
    max_diff,
    official_pretrained_keys,
    random_official_pretrained,
)

ATOL = 1e-5
RTOL = 1e-5


def _config(fx: TaskFixture, first_token_twice: bool = True) -> VQAConfig:
    """The fixture's sizes; `first_token_twice` = the official ranking (the quirk) for parity."""
    cfg = VQAConfig(
        backbone=fx.backbone, distill=fx.meta["albef_config"]["distill"], first_token_twice=first_token_twice
    )
    assert (
        cfg.num_decoder_layers == fx.meta["sizes"]["text_encoder_num_hidden_layers"] - fx.meta["sizes"]["fusion_layer"]
    )
    assert cfg.num_decoder_layers == fx.meta["decoder_config"]["num_hidden_layers"]
    return cfg


def _model(fx: TaskFixture, first_token_twice: bool = True) -> ALBEFVQA:
    model = build_vqa(_config(fx, first_token_twice))
    report = load_vqa_state(model, fx.state)
    assert not report.missing and not report.unexpected, report.summary()
    return model.eval()


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return abs(float(ours) - float(ref)) / abs(float(ref))


def test_official_checkpoint_imports_every_tensor(vqa_fx: TaskFixture) -> None:
    sd = _model(vqa_fx).state_dict()
    tied = {b for _, b in vqa_fx.meta["tied_state_keys"]}  # decoder.weight / decoder.bias: tied structurally
    for key, tensor in vqa_fx.state.items():
        if key.endswith("position_ids") or key in tied:
            continue
        ours = key.replace("text_decoder.bert.", "text_decoder.").replace("text_decoder_m.bert.", "text_decoder_m.")
        assert torch.equal(sd[ours], tensor), key
    assert len(sd) == len(vqa_fx.state) - 4 - len(tied)  # 4 position_ids buffers


@torch.no_grad()
def test_training_tensors(vqa_fx: TaskFixture) -> None:
    o, i, m = vqa_fx.outputs, vqa_fx.outputs["inputs"], _model(vqa_fx)
    q_ids, q_mask, a_ids, a_mask = (
        o["question_input_ids"],
        o["question_attention_mask"],
        o["answer_input_ids"],
        o["answer_attention_mask"],
    )
    assert torch.equal(a_ids.masked_fill(a_ids == m.pad_token_id, -100), o["answer_targets"])
    rep = torch.repeat_interleave(torch.arange(len(i["k"])), torch.tensor(i["k"]))
    assert torch.equal(rep, o["question_index_per_answer"])
    assert max_diff(m.visual_encoder(i["image"]), o["image_embeds"]) <= ATOL
    states = m.encode_question(i["image"], q_ids, q_mask)
    assert max_diff(states, o["question_states"]) <= ATOL
    hidden = m.text_decoder.hidden_states(a_ids, a_mask, states[rep], q_mask[rep])
    assert max_diff(hidden, o["decoder_hidden"]) <= ATOL
    logits = m.text_decoder(a_ids, a_mask, states[rep], q_mask[rep])
    top5 = logits.topk(5, dim=-1)
    assert max_diff(top5.values, o["decoder_logits_top5"]) <= ATOL
    assert torch.equal(top5.indices, o["decoder_logits_top5_ids"])
    token_logprobs = answer_token_logprobs(logits, a_ids, m.pad_token_id)
    assert max_diff(token_logprobs, o["answer_token_logprob"]) <= ATOL
    assert max_diff(-token_logprobs.sum(1), o["answer_nll"]) <= ATOL
    states_m = m.encode_question_m(i["image"], q_ids, q_mask)
    logits_m = m.text_decoder_m(a_ids, a_mask, states_m[rep], q_mask[rep])
    assert max_diff(answer_loss(logits, a_ids, m.pad_token_id, logits_m, 1.0), o["answer_distill_ce"]) <= ATOL
    assert (
        max_diff(answer_loss(logits, a_ids, m.pad_token_id, logits_m, i["alpha"]), o["answer_loss_pre_update"]) <= ATOL
    )
    out = m(i["image"], q_ids, q_mask, a_ids, a_mask, i["weights"], torch.tensor(i["k"]), i["alpha"])
    assert _rel(out.loss, o["loss_pre_update"]) <= RTOL


def test_training_forward(vqa_fx: TaskFixture) -> None:
    o, i, m = vqa_fx.outputs, vqa_fx.outputs["inputs"], _model(vqa_fx)
    f = o["forward"]
    m.momentum_update()
    twins, sources = m._ema_lists()
    assert max((t - s).abs().max().item() for t, s in zip(twins, sources)) == f["momentum_max_abs_diff_after"]
    args = (o["question_input_ids"], o["question_attention_mask"], o["answer_input_ids"], o["answer_attention_mask"])
    with torch.no_grad():
        out = m(i["image"], *args, i["weights"], torch.tensor(i["k"]), i["alpha"])
    assert _rel(out.loss, f["loss"]) <= RTOL
    assert max_diff(out.answer_loss, f["answer_loss"]) <= ATOL
    m.train()
    out = m(i["image"], *args, i["weights"], torch.tensor(i["k"]), i["alpha"])
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@torch.no_grad()
def test_rank_answer(vqa_fx: TaskFixture) -> None:
    """Official rank_answer (first token counted twice: `first_token_twice=True`) and evaluation()."""
    i, r, m = vqa_fx.outputs["inputs"], vqa_fx.outputs["rank_answer"], _model(vqa_fx)
    q_ids, q_mask = r["question_input_ids"], r["question_attention_mask"]
    a_ids, a_mask = r["answer_list_input_ids"], r["answer_list_attention_mask"]
    states = m.encode_question(i["test_image"], q_ids, q_mask)
    start = a_ids[:1, :1].expand(states.shape[0], 1)
    assert max_diff(m.text_decoder(start, None, states, q_mask)[:, 0], r["first_token_logits"]) <= ATOL
    assert max_diff(m.first_token_probs(states, q_mask, a_ids), r["prob_first_token"]) <= ATOL
    ranking = m.rank_answers(i["test_image"], q_ids, q_mask, a_ids, a_mask, i["k_test"])
    assert torch.equal(ranking.first_topk_ids, r["first_topk_ids"])
    assert max_diff(ranking.first_topk_probs, r["first_topk_probs"]) <= ATOL
    token_logprobs = m.candidate_logprobs(states, q_mask, a_ids[ranking.first_topk_ids], a_mask[ranking.first_topk_ids])
    assert max_diff(token_logprobs, r["candidate_token_logprob"]) <= ATOL
    assert max_diff(-token_logprobs.sum(-1), r["candidate_nll"]) <= ATOL
    gap = (token_logprobs[..., 0] - ranking.first_topk_probs.log()).abs().max()
    assert gap <= 10 * r["first_token_logprob_gap"] + 1e-6  # the two first-token log-probs agree to ~1e-6
    assert max_diff(ranking.scores, r["log_probs_sum"]) <= ATOL
    assert torch.equal(ranking.topk_ids, r["topk_ids"])
    assert max_diff(ranking.topk_probs, r["topk_probs"]) <= ATOL
    answers = [i["answer_list"][ranking.topk_ids[b, ranking.topk_probs[b].argmax()]] for b in range(len(q_ids))]
    result = [{"question_id": int(q), "answer": a} for q, a in zip(i["test_question_ids"], answers)]
    assert result == vqa_fx.outputs["evaluation_result"]


@torch.no_grad()
def test_default_ranking_counts_the_first_token_once(vqa_fx: TaskFixture) -> None:
    i, r = vqa_fx.outputs["inputs"], vqa_fx.outputs["rank_answer"]
    m = _model(vqa_fx, first_token_twice=False)
    args = (
        r["question_input_ids"],
        r["question_attention_mask"],
        r["answer_list_input_ids"],
        r["answer_list_attention_mask"],
    )
    ranking = m.rank_answers(i["test_image"], *args, i["k_test"])
    assert torch.equal(ranking.first_topk_ids, r["first_topk_ids"])  # the candidates are the same
    assert max_diff(ranking.scores, -r["candidate_nll"]) <= ATOL  # scored by the answer log-likelihood alone
    assert max_diff(ranking.scores + ranking.first_topk_probs.log(), r["log_probs_sum"]) <= ATOL


@pytest.mark.parametrize("depth", ["tiny", "full_depth"])
def test_vqa_key_loop(vqa_fx: TaskFixture, depth: str) -> None:
    remap = vqa_fx.remap[depth]
    cfg = vqa_fx.backbone if depth == "tiny" else type(vqa_fx.backbone).base()
    names = official_task_keys(official_pretrained_keys(cfg), "vqa", fusion_layer=cfg.text.fusion_layer)
    task_keys = set(remap["loaded"]) | set(remap["missing_keys"])
    if depth == "tiny":
        assert task_keys == set(vqa_fx.key_shapes())
    assert {k: v for k, v in names.items() if k in task_keys} == remap["loaded"]
    assert sorted(task_keys - set(names)) == sorted(remap["missing_keys"])
    assert sorted(set(names) - task_keys) == sorted(remap["unexpected_keys"])


def test_pretrained_import_builds_the_decoder_from_fusion_layers(vqa_fx: TaskFixture) -> None:
    cfg = _config(vqa_fx)
    pretrained = random_official_pretrained(cfg.backbone)
    model = build_vqa(cfg)
    report = load_vqa_state(model, pretrained)
    names = official_task_keys(pretrained, "vqa", fusion_layer=cfg.backbone.text.fusion_layer)
    assert_import_follows_loop(names, report.mapped)
    assert sorted(report.unexpected) == sorted(vqa_fx.remap["tiny"]["unexpected_keys"])
    f, sd = cfg.backbone.text.fusion_layer, model.state_dict()
    for i in range(cfg.num_decoder_layers):
        for ours, source in (("text_decoder", "text_encoder"), ("text_decoder_m", "text_encoder_m")):
            key = f"encoder.layer.{i}.crossattention.self.key.weight"
            src = pretrained[f"{source}.bert.encoder.layer.{f + i}.crossattention.self.key.weight"]
            assert torch.equal(sd[f"{ours}.{key}"], src)
    assert torch.equal(model.text_decoder.cls.predictions.bias, pretrained["text_encoder.cls.predictions.bias"])
    assert torch.equal(
        model.text_decoder.embeddings.word_embeddings.weight,
        pretrained["text_encoder.bert.embeddings.word_embeddings.weight"],
    )


def test_decoder_depth_must_be_positive(vqa_fx: TaskFixture) -> None:
    with pytest.raises(ValueError, match="decoder_layers"):
        dataclasses.replace(_config(vqa_fx), decoder_layers=0)
