"""ViT image encoder: timm's VisionTransformer configured as ALBEF's, plus position-embedding resampling.

Parameter names are timm's, which are also the official ALBEF `visual_encoder.*` names and DeiT's, so
DeiT-B/16 and official checkpoints load by name (after `resample_pos_embed` for a new resolution).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from model.config import VisionConfig

__all__ = ["VisionEncoder", "build_vision_encoder", "resample_pos_embed"]


class VisionEncoder(VisionTransformer):
    """timm ViT whose forward returns all tokens after the final LayerNorm.

    Inputs: image [B, C, H, W] at `config.image_size`.
    Returns: [B, 1 + (H/p)*(W/p), width], class token first (ALBEF's `image_embeds`).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            class_token=True,
            num_classes=0,
            global_pool="",
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
            drop_path_rate=config.drop_path_rate,
        )
        self.config = config
        if config.weight_init == "fan_in":  # timm drew std 0.02 Linear weights; redraw them (biases stay 0)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=module.in_features**-0.5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_features(image)


def build_vision_encoder(config: VisionConfig) -> VisionEncoder:
    return VisionEncoder(config)


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resample [1, 1 + g*g, D] position embeddings to a `grid_size` x `grid_size` patch grid.

    Matches the official `interpolate_pos_embed`: the class-token slot is kept as is and the patch grid
    is resized with `F.interpolate(mode='bicubic', align_corners=False)` WITHOUT antialiasing (timm's
    default `antialias=True` would give different numbers when shrinking the grid).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, 1 + g*g, D], got {tuple(pos_embed.shape)}")
    old_grid = round((pos_embed.shape[1] - 1) ** 0.5)
    if old_grid * old_grid + 1 != pos_embed.shape[1]:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} tokens: not 1 class token + a square grid")
    if old_grid == grid_size:
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed,
        new_size=[grid_size, grid_size],
        old_size=[old_grid, old_grid],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
        align_corners=False,
    )
