"""Official checkpoint import/export: every key of both official key lists, shapes, identity, layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ALBEFConfig, TextConfig, VisionConfig, build_albef
from model.convert import expected_shapes, from_official, to_official

from albef_testutils import load_oracle_model

BASE_KEYS = "official_base_keys.txt"
SHARED_FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"  # beside the checkout
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def read_key_file(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`key<TAB>(shape)<TAB>dtype` lines -> {key: (shape, dtype)}."""
    keys = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape, dtype = line.split("\t")
            dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
            keys[key] = (dims, DTYPES[dtype])
    return keys


def zero_state(keys: dict) -> dict[str, torch.Tensor]:
    """A state dict with the listed shapes that allocates nothing (expanded scalars)."""
    return {k: torch.zeros((), dtype=dtype).expand(shape) for k, (shape, dtype) in keys.items()}


def check_full_coverage(keys: dict, cfg: ALBEFConfig) -> None:
    ours, report = from_official(zero_state(keys), cfg)
    assert not report.missing and not report.unexpected and not report.interpolated, report.summary()
    covered = {src for src, _ in report.mapped} | set(report.skipped)
    assert covered == set(keys), f"not covered: {set(keys) - covered}"
    assert set(ours) == set(expected_shapes(cfg))
    for src, dst in report.mapped:
        assert tuple(ours[dst].shape) == keys[src][0]
    assert all("position_ids" in k or "decoder" in k for k in report.skipped), report.skipped


def test_import_covers_every_tiny_key(oracle_dir: Path, oracle_cfg: ALBEFConfig) -> None:
    keys = read_key_file(oracle_dir / "albef_keys.txt")
    check_full_coverage(keys, oracle_cfg)
    official = torch.load(oracle_dir / "albef_state.pth", weights_only=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in official.items()} == keys


def test_import_covers_every_base_key(oracle_dir: Path) -> None:
    """The full-size official key list, against a base config at that file's resolution and queue size."""
    candidates = [oracle_dir.parent / BASE_KEYS, SHARED_FIXTURES / BASE_KEYS]
    keys = read_key_file(next((p for p in candidates if p.is_file()), candidates[-1]))
    grid = round((keys["visual_encoder.pos_embed"][0][1] - 1) ** 0.5)
    embed_dim, queue_size = keys["image_queue"][0]
    cfg = ALBEFConfig.base(image_size=grid * 16, queue_size=queue_size, embed_dim=embed_dim)
    check_full_coverage(keys, cfg)


def test_export_then_import_is_identity(oracle_dir: Path, oracle_cfg: ALBEFConfig) -> None:
    model = build_albef(oracle_cfg)
    ours = model.state_dict()
    official = to_official(ours)
    keys = read_key_file(oracle_dir / "albef_keys.txt")
    assert {k: (tuple(v.shape), v.dtype) for k, v in official.items()} == keys
    back, report = from_official({"model": official}, oracle_cfg)
    assert not report.missing and not report.unexpected
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_official_import_then_export_round_trips(oracle_dir: Path, oracle_cfg: ALBEFConfig) -> None:
    official = torch.load(oracle_dir / "albef_state.pth", weights_only=True)
    model = load_oracle_model(oracle_dir)
    exported = to_official(model.state_dict())
    assert set(exported) == set(official)
    assert all(torch.equal(exported[k], official[k]) for k in official)


def official_interpolate(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """The official `interpolate_pos_embed` maths, written out for the test."""
    old_grid = round((pos_embed.shape[1] - 1) ** 0.5)
    tokens = pos_embed[:, 1:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("image_size", [64, 16])  # upsample 2x2 -> 4x4 and downsample 2x2 -> 1x1
def test_pos_embed_interpolated_for_both_encoders(oracle_dir: Path, oracle_cfg: ALBEFConfig, image_size: int) -> None:
    official = torch.load(oracle_dir / "albef_state.pth", weights_only=True)
    cfg = ALBEFConfig(
        vision=VisionConfig(**{**oracle_cfg.vision.__dict__, "image_size": image_size}),
        text=oracle_cfg.text,
        embed_dim=oracle_cfg.embed_dim,
        queue_size=oracle_cfg.queue_size,
    )
    ours, report = from_official(official, cfg)
    assert sorted(report.interpolated) == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    grid = image_size // 16
    for key in report.interpolated:
        expected = official_interpolate(official[key], grid)
        assert ours[key].shape == (1, grid * grid + 1, cfg.vision.width)
        torch.testing.assert_close(ours[key], expected, rtol=0, atol=0)
        assert torch.equal(ours[key][:, 0], official[key][:, 0])  # CLS slot kept
    model = build_albef(cfg)
    model.load_state_dict(ours, strict=True)
    with torch.no_grad():
        assert model.encode_image(torch.randn(2, 3, image_size, image_size))[0].shape == (
            2,
            grid * grid + 1,
            cfg.vision.width,
        )


def test_finetuned_layout(oracle_dir: Path, oracle_cfg: ALBEFConfig) -> None:
    """Fine-tuned checkpoints: no `bert.` in text_encoder.*, no MLM head, plus idx_queue."""
    official = torch.load(oracle_dir / "albef_state.pth", weights_only=True)
    finetuned = {k.replace(".bert.", "."): v for k, v in official.items() if ".cls." not in k}
    finetuned["idx_queue"] = torch.full((1, oracle_cfg.queue_size), -100)
    ours, report = from_official({"model": finetuned}, oracle_cfg)
    assert report.layout == "finetune"
    assert "idx_queue" in report.skipped
    assert report.missing and all(".cls.predictions." in k for k in report.missing)
    reference, _ = from_official(official, oracle_cfg)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_mismatches_fail_loudly(oracle_dir: Path, oracle_cfg: ALBEFConfig) -> None:
    official = torch.load(oracle_dir / "albef_state.pth", weights_only=True)
    with pytest.raises(ValueError, match="unknown_head.weight"):
        from_official(official | {"unknown_head.weight": torch.zeros(2)}, oracle_cfg)
    _, report = from_official(official | {"unknown_head.weight": torch.zeros(2)}, oracle_cfg, strict=False)
    assert report.unexpected == ["unknown_head.weight"]
    bad = dict(official)
    bad["itm_head.weight"] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match="itm_head.weight"):
        from_official(bad, oracle_cfg)
    untied = dict(official)
    untied["text_encoder.cls.predictions.decoder.weight"] = torch.zeros_like(
        untied["text_encoder.cls.predictions.decoder.weight"]
    )
    with pytest.raises(ValueError, match="tie"):
        from_official(untied, oracle_cfg)
    wider = ALBEFConfig(
        vision=oracle_cfg.vision,
        text=TextConfig(**{**oracle_cfg.text.__dict__, "intermediate_size": 256}),
        embed_dim=oracle_cfg.embed_dim,
        queue_size=oracle_cfg.queue_size,
    )
    with pytest.raises(ValueError, match="intermediate.dense"):
        from_official(official, wider)
