"""Weakly supervised grounding vs the official `Grounding.val` + `grounding_eval`: Grad-CAM in itm mode
(cross-attention of a fusion layer) and itc mode (a ViT block), at every recorded block, and the box
ranking (upsampled maps, proposal scores, predicted boxes, IoU, accuracy per split)."""

from __future__ import annotations

import pytest
import torch

from model.heads.grounding import (
    best_proposal,
    box_iou,
    itc_gradcam,
    itm_gradcam,
    official_gradcam_blocks,
    proposal_scores,
    upsample_gradcam,
)
from model.retrieval import ALBEFRetrieval, build_retrieval, load_retrieval_state

from heads_testutils import TaskFixture, max_diff

ATOL = 1e-5
GRADCAM_RTOL = 1e-5  # itm Grad-CAM values are ~1e-4: also held to 1e-5 of the map's largest value


def _model(fx: TaskFixture) -> ALBEFRetrieval:
    model = build_retrieval(fx.backbone)
    report = load_retrieval_state(model, fx.state)
    assert not report.missing and not report.unexpected, report.summary()
    return model.eval()


def test_default_blocks_scale_the_official_block_num(grounding_fx: TaskFixture) -> None:
    blocks = official_gradcam_blocks(grounding_fx.backbone)
    assert blocks == {
        "itm": grounding_fx.outputs["gradcam"]["itm_default_block"],
        "itc": grounding_fx.outputs["gradcam"]["itc_default_block"],
    }
    assert official_gradcam_blocks(type(grounding_fx.backbone).base()) == {"itm": 8, "itc": 8}  # --block_num 8


def test_grounding_state_is_the_retrieval_state(grounding_fx: TaskFixture, retrieval_fx: TaskFixture) -> None:
    assert grounding_fx.state.keys() == retrieval_fx.state.keys()
    assert all(torch.equal(v, retrieval_fx.state[k]) for k, v in grounding_fx.state.items())


@pytest.mark.parametrize("mode", ["itm", "itc"])
def test_gradcam_every_block(grounding_fx: TaskFixture, mode: str) -> None:
    o, i, m = grounding_fx.outputs, grounding_fx.outputs["inputs"], _model(grounding_fx)
    fn = itm_gradcam if mode == "itm" else itc_gradcam
    for block in grounding_fx.meta["grounding_blocks"][f"{mode}_all"]:
        ref = o["gradcam"][f"{mode}_block{block}"]
        assert ref["block"] == block and ref["ref_ids"] == i["ref_ids"].tolist()
        out = fn(m, i["image"], o["input_ids"], o["attention_mask"], block)
        assert max_diff(out.attention_map, ref["attention_map"]) <= ATOL, (mode, block)
        assert max_diff(out.attn_gradients, ref["attn_gradients"]) <= ATOL, (mode, block)
        diff = max_diff(out.gradcam, ref["gradcam"])
        assert diff <= ATOL and diff <= GRADCAM_RTOL * ref["gradcam"].abs().max().item(), (mode, block)
        if mode == "itm":
            assert out.itm_logits is not None and max_diff(out.itm_logits, ref["itm_logits"]) <= ATOL
        assert not any(p.grad is not None for p in m.parameters())  # no side effects on the model


@pytest.mark.parametrize("mode", ["itm", "itc"])
def test_box_ranking_and_accuracy(grounding_fx: TaskFixture, mode: str) -> None:
    o, i, m = grounding_fx.outputs, grounding_fx.outputs["inputs"], _model(grounding_fx)
    block = o["gradcam"][f"{mode}_default_block"]
    ref = o["gradcam"][f"{mode}_block{block}"]["grounding_eval"]
    fn = itm_gradcam if mode == "itm" else itc_gradcam
    gradcam = fn(m, i["image"], o["input_ids"], o["attention_mask"], block).gradcam
    hits: dict[str, list[bool]] = {}
    for j, (height, width) in enumerate(i["image_hw"]):
        heatmap = upsample_gradcam(gradcam[j], height, width)
        assert max_diff(heatmap, ref["upsampled"][j]) <= ATOL
        scores = proposal_scores(heatmap, i["proposals"][j], i["box_alpha"])
        assert max_diff(scores, ref["box_scores"][j]) <= ATOL
        box = best_proposal(scores, i["proposals"][j])
        assert box == ref["pred_box"][j]
        iou = box_iou(i["gt_boxes"][j], box)
        assert iou == ref["iou"][j]
        hits.setdefault(i["splits"][j], []).append(iou >= 0.5)
    accuracy = {f"{split}_d": sum(h) / len(h) for split, h in hits.items()}
    assert accuracy == ref["result"] == grounding_fx.meta["scalars"][f"{mode}_block{block}"]


def test_box_helpers_on_hand_built_cases() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 10, 10]) == 50 / 150  # inclusive pixels: x 5..9 overlap
    assert box_iou([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0
    heatmap = torch.zeros(4, 4)
    heatmap[2:, 2:] = 1.0
    proposals = [[0, 0, 2, 2], [2, 2, 2, 2], [0, 0, 4, 4]]
    scores = proposal_scores(heatmap, proposals, 0.5)
    assert scores.tolist() == [0.0, 2.0, 1.0]
    assert best_proposal(scores, proposals) == [2, 2, 2, 2]
    assert best_proposal(torch.tensor([1.0, 1.0]), [[0, 0, 1, 1], [1, 1, 1, 1]]) == [0, 0, 1, 1]  # first of ties
    assert best_proposal(torch.zeros(2), [[0, 0, 1, 1], [1, 1, 1, 1]]) is None  # nothing scores > 0
