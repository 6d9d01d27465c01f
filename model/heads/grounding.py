"""Weakly supervised visual grounding (RefCOCO+): Grad-CAM of the retrieval model, and ranking of box
proposals by the Grad-CAM mass they cover.

The model is the retrieval model (`ALBEFRetrieval`, fine-tuned as the official Grounding.py does with
the retrieval losses). Evaluation, as the official `Grounding.val` + `dataset/utils.grounding_eval`:
  - "itm" mode (the paper's): objective = sum of ITM "match" logits of the full multimodal pass;
    Grad-CAM = attention x positive gradient of the cross-attention of ONE fusion layer (`block`, the
    3rd fusion layer by default), per head, over the image patches; mean over heads, then over ALL text
    positions (padding included but zeroed, [CLS] included: the official arithmetic, whose scale depends
    on the batch's padding; the ranking of one image's boxes does not);
  - "itc" mode: objective = sum_b image_feat_b . text_feat_b / temp (the raw, unclamped temperature);
    Grad-CAM from the [CLS]-query row of ViT block `block`'s self-attention;
  - the [g, g] map is upsampled bicubically to the image size (no normalisation) and each proposal
    [x, y, w, h] scores sum(map inside) / (w * h) ** alpha; the best-scoring proposal (first among
    ties, score > 0) is the prediction; a hit is IoU >= 0.5 (inclusive-pixel IoU).

The attention probabilities are computed explicitly for the one layer/block (the encoders use fused
SDPA elsewhere) and their gradient is taken with `torch.autograd.grad`: no hooks, no module state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F

from model.config import ALBEFConfig
from model.retrieval import ALBEFRetrieval
from model.text import BertLayer

__all__ = [
    "GradCAM",
    "official_gradcam_blocks",
    "itm_gradcam",
    "itc_gradcam",
    "upsample_gradcam",
    "proposal_scores",
    "best_proposal",
    "box_iou",
]

GradCAMMode = Literal["itm", "itc"]


class GradCAM(NamedTuple):
    gradcam: torch.Tensor  # [B, g, g] fp32, g = patches per image side
    attention_map: torch.Tensor  # [B, H, Lq, 1 + g*g] attention probabilities of the block
    attn_gradients: torch.Tensor  # same shape: d objective / d attention
    itm_logits: torch.Tensor | None  # [B, 2] in itm mode


def official_gradcam_blocks(config: ALBEFConfig) -> dict[GradCAMMode, int]:
    """The official default `--block_num 8` in each mode, scaled to the model's depth: itm = the 3rd of
    BERT-base's 6 fusion layers (text layer index), itc = the 9th of ViT-B's 12 blocks (block index)."""
    text = config.text
    return {
        "itm": text.fusion_layer + round(2 * (text.num_layers - text.fusion_layer) / 6),
        "itc": round(8 * config.vision.depth / 12),
    }


def _cross_attention_with_probs(
    layer: BertLayer, x: torch.Tensor, keys: torch.Tensor, image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fusion layer whose cross-attention (to every image token) is computed explicitly -> (out, probs)."""
    cross = layer.crossattention
    assert cross is not None
    h = layer.attention(x, x, keys)
    attn = cross.self
    q, k, v = attn._heads(attn.query(h)), attn._heads(attn.key(image)), attn._heads(attn.value(image))
    probs = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # [B, H, L, N]
    b, heads, length, d = (*probs.shape[:3], q.shape[-1])
    h = cross.output((probs @ v).transpose(1, 2).reshape(b, length, heads * d), h)
    return layer.output(layer.intermediate(h), h), probs


def itm_gradcam(
    model: ALBEFRetrieval, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, block: int
) -> GradCAM:
    """Grad-CAM on the cross-attention of text layer `block` (a fusion layer) for the ITM match logit."""
    text = model.config.text
    if not text.fusion_layer <= block < text.num_layers:
        raise ValueError(f"itm Grad-CAM block {block} is not a fusion layer [{text.fusion_layer}, {text.num_layers})")
    with torch.enable_grad():
        image_embeds = model.visual_encoder(image)
        keys = attention_mask.bool()[:, None, None, :]
        x = model.text_encoder(input_ids, attention_mask, mode="text")
        probs = None
        for index in range(text.fusion_layer, text.num_layers):
            layer = cast(BertLayer, model.text_encoder.encoder.layer[index])
            if index == block:
                x, probs = _cross_attention_with_probs(layer, x, keys, image_embeds)
            else:
                x = layer(x, keys, image_embeds, None)
        assert probs is not None
        logits = model.itm_head(x[:, 0, :]).float()
        (grads,) = torch.autograd.grad(logits[:, 1].sum(), probs)
    probs, grads = probs.detach(), grads.detach()
    grid = model.config.vision.grid_size
    b, heads = probs.shape[:2]
    mask = attention_mask.view(b, 1, -1, 1, 1).to(probs.dtype)
    cams = probs[..., 1:].reshape(b, heads, -1, grid, grid) * mask
    positive = grads[..., 1:].clamp(min=0).reshape(b, heads, -1, grid, grid) * mask
    gradcam = (cams * positive).mean(1).mean(1)  # heads, then every text position (padding included)
    return GradCAM(gradcam.float(), probs, grads, logits.detach())


def _vit_attention_with_probs(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention` (untyped: timm is not type-checked) on x [B, N, C] with explicit probabilities (eval: no dropout) -> (out, probs)."""
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)  # [B, H, N, N]
    out = attn.norm((probs @ v).transpose(1, 2).reshape(b, n, c))
    return attn.proj(out), probs


def itc_gradcam(
    model: ALBEFRetrieval, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, block: int
) -> GradCAM:
    """Grad-CAM on ViT block `block`'s self-attention ([CLS] query row) for the image-text similarity."""
    vit = model.visual_encoder
    if not 0 <= block < len(vit.blocks):
        raise ValueError(f"itc Grad-CAM block {block} outside the ViT's {len(vit.blocks)} blocks")
    with torch.no_grad():
        _, text_feat = model.encode_text(input_ids, attention_mask)
    with torch.enable_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image))))
        probs = None
        for index, blk in enumerate(vit.blocks):
            if index == block:
                h, probs = _vit_attention_with_probs(blk.attn, blk.norm1(x))
                x = x + blk.drop_path1(blk.ls1(h))
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            else:
                x = blk(x)
        assert probs is not None
        image_feat = F.normalize(model.vision_proj(vit.norm(x)[:, 0, :]).float(), dim=-1)
        objective = ((image_feat * text_feat).sum(1) / model.temp.float()).sum()
        (grads,) = torch.autograd.grad(objective, probs)
    probs, grads = probs.detach(), grads.detach()
    grid = model.config.vision.grid_size
    b, heads = probs.shape[:2]
    cam = probs[:, :, 0, 1:].reshape(b, heads, grid, grid)
    grad = grads[:, :, 0, 1:].reshape(b, heads, grid, grid).clamp(0)
    return GradCAM((cam * grad).mean(1).float(), probs, grads, None)


def upsample_gradcam(gradcam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[g, g] map -> [height, width], bicubic, align_corners False, NOT normalised (official eval path;
    bicubic overshoot can make small negative values)."""
    g = gradcam.shape[-1]
    return F.interpolate(gradcam.view(1, 1, g, g).float(), size=(height, width), mode="bicubic").squeeze()


def proposal_scores(heatmap: torch.Tensor, proposals: Sequence[Sequence[float]], alpha: float) -> torch.Tensor:
    """Score [P] of each [x, y, w, h] proposal: heatmap mass inside (pixel slices at int(y):int(y + h),
    int(x):int(x + w)) / (w * h) ** alpha."""
    scores = []
    for x, y, w, h in (box[:4] for box in proposals):
        inside = heatmap[int(y) : int(y + h), int(x) : int(x + w)].sum()
        scores.append(inside / (w * h) ** alpha)
    return torch.stack(scores) if scores else torch.zeros(0)


def best_proposal(scores: torch.Tensor, proposals: Sequence[Sequence[float]]) -> list[float] | None:
    """The first proposal with the highest score, if that score is > 0; else None (the official loop
    would keep the previous ref's box, or fail on the first one: a miss here)."""
    best, best_score = None, 0.0
    for box, score in zip(proposals, scores.tolist()):
        if score > best_score:
            best, best_score = list(box[:4]), score
    return best


def box_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes with inclusive pixel ends (x2 = x + w - 1), the official computeIoU."""
    ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    ix2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    iy2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union
