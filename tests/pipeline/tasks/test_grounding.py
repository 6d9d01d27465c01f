"""Grounding pipeline pieces: an official fine-tuned checkpoint ({'model': state_dict}, official names)
through the stage's loading and scoring code against the official `Grounding.val` + `grounding_eval`
fixture; the eval samples through the loader (boxes in the original frame); the map images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_prep.synthetic import COLORS
from data_prep.synthetic_grounding import write_synthetic_grounding
from model import config_from_official
from pipeline.config import ConfigError, load_config
from pipeline.runtime.io import read_checkpoint
from pipeline.stages.finetune_grounding import GroundingConfig
from pipeline.tasks.grounding import (
    GroundingEvalConfig,
    RefResult,
    build_grounding_from_checkpoint,
    grounding_gradcams,
    grounding_report,
    score_ref,
    write_gradcam_map,
)

ATOL = 1e-5


def _fixture(heads_dir: Path) -> tuple[dict, dict, dict]:
    folder = heads_dir / "grounding"
    meta = json.loads((folder / "grounding_meta.json").read_text())
    bert = json.loads((folder / "grounding_bert_config.json").read_text())
    state = torch.load(folder / "grounding_state.pth", weights_only=True)
    outputs = torch.load(folder / "grounding_outputs.pt", weights_only=True)
    backbone = config_from_official(meta["albef_config"], bert, meta["size_shims"].get("vit_overrides"))
    return {"backbone": backbone, "meta": meta}, state, outputs


@pytest.mark.parametrize("mode", ["itm", "itc"])
def test_official_checkpoint_through_the_stage_path(heads_dir: Path, tmp_path: Path, mode: str) -> None:
    fx, state, o = _fixture(heads_dir)
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": state}, path)  # the official Grounding.py layout (plus optimizer etc., unread)
    model, report = build_grounding_from_checkpoint(read_checkpoint(path).state_dict, fx["backbone"])
    assert not report.missing and not report.unexpected, report.summary()
    model.eval()
    i = o["inputs"]
    cfg = GroundingEvalConfig(mode=mode, box_alpha=i["box_alpha"])  # type: ignore[arg-type]
    block = cfg.gradcam_block(fx["backbone"])
    assert block == o["gradcam"][f"{mode}_default_block"]
    ref = o["gradcam"][f"{mode}_block{block}"]
    cams = grounding_gradcams(model, i["image"], o["input_ids"], o["attention_mask"], mode, block)  # type: ignore[arg-type]
    assert (cams - ref["gradcam"]).abs().max().item() <= ATOL
    results = []
    for j, cam in enumerate(cams):
        label = {"ref_id": int(i["ref_ids"][j]), "split": i["splits"][j], "box": i["gt_boxes"][j],
                 "proposals": i["proposals"][j], "image_hw": list(i["image_hw"][j])}  # fmt: skip
        result = score_ref(cam, label, cfg)
        assert result.pred_box == ref["grounding_eval"]["pred_box"][j]
        assert result.iou == ref["grounding_eval"]["iou"][j]
        results.append(result)
    counts = {"images": len(results), "bad_samples": 0, "empty_expressions": 0}
    accuracy = grounding_report(results, cfg, counts, 0.0, block)["accuracy"]
    expected = {k.removesuffix("_d"): 100.0 * v for k, v in ref["grounding_eval"]["result"].items()}
    assert accuracy == pytest.approx(expected) and set(accuracy) == {"val", "testA", "testB"}
    assert not any(p.grad is not None for p in model.parameters())


def test_report_chance_upper_bound_and_misses() -> None:
    cfg = GroundingEvalConfig()
    results = [
        RefResult(1, "val", 1.0, 1 / 3, [0, 0, 1, 1]),
        RefResult(2, "val", 0.2, 1 / 3, [0, 0, 1, 1]),
        RefResult(3, "testA", None, 0.0, None),  # nothing scored > 0: a miss
        RefResult(4, "testA", 0.5, 0.5, [0, 0, 1, 1]),  # IoU exactly 0.5 is a hit
    ]
    rep = grounding_report(results, cfg, {"images": 2, "bad_samples": 0, "empty_expressions": 0}, 0.0, 3)
    assert rep["accuracy"] == {"testA": 50.0, "val": 50.0} and rep["accuracy_all"] == 50.0
    assert rep["chance"] == pytest.approx({"testA": 25.0, "val": 100 / 3})
    assert rep["upper_bound"] == {"testA": 50.0, "val": 100.0} and rep["no_positive_score"] == 1
    with pytest.raises(ValueError, match="no expression"):
        grounding_report([], cfg, {"images": 0, "bad_samples": 0, "empty_expressions": 0}, 0.0, 3)


def test_score_ref_ranks_in_the_original_frame() -> None:
    """A map hot in the top-right quarter picks the top-right proposal of a 40 x 80 (h x w) image."""
    cam = torch.zeros(4, 4)
    cam[0:2, 2:4] = 1.0
    label = {"ref_id": 7, "split": "val", "box": [40, 0, 40, 20],
             "proposals": [[0, 0, 40, 20], [40, 0, 40, 20], [0, 20, 80, 20]], "image_hw": [40, 80]}  # fmt: skip
    result = score_ref(cam, label, GroundingEvalConfig())
    assert result.pred_box == [40, 0, 40, 20] and result.iou == 1.0 and result.chance == pytest.approx(1 / 3)


def test_map_image_is_written_at_the_original_size(tmp_path: Path) -> None:
    image = torch.full((3, 16, 16), 128, dtype=torch.uint8)
    label = {"ref_id": 3, "split": "testB", "box": [2, 2, 10, 6], "proposals": [[2, 2, 10, 6]], "image_hw": [12, 20]}
    result = RefResult(3, "testB", 0.0, 1.0, [14.0, 8.0, 4.0, 3.0])
    cam = torch.rand(4, 4)
    write_gradcam_map(tmp_path / "m.png", image, cam, label, result, "the red circle")
    with Image.open(tmp_path / "m.png") as png:
        assert png.size == (20, 12) and png.format == "PNG"
        rgb = png.convert("RGB")
        assert rgb.getpixel((11, 7)) == (0, 255, 0) and rgb.getpixel((17, 10)) == (255, 0, 0)  # GT / chosen corners
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]  # atomic: no temporary left


def test_stage_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="eval.iou_threshold"):
        load_config(GroundingConfig, "grounding_tiny_cpu", {"data.train": ["/d"], "eval.iou_threshold": 0})
    with pytest.raises(ConfigError, match="eval.mode"):
        load_config(GroundingConfig, "grounding_tiny_cpu", {"data.train": ["/d"], "eval.mode": "grad"})
    cfg = load_config(GroundingConfig, "grounding_refcoco", {})
    assert (cfg.model.image_res, cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.optim.min_lr) == (
        384,
        32,
        5,
        1e-5,
        1e-6,
    )
    assert (cfg.train.alpha, cfg.train.alpha_ramp_epochs, cfg.model.queue_size, cfg.eval.block) == (0.4, 1.0, 65536, 8)


def test_synthetic_grounding_files(tmp_path: Path) -> None:
    synth = write_synthetic_grounding(tmp_path, splits={"train": 2, "val": 2, "testA": 1, "testB": 1}, seed=3)
    val = json.loads(synth.files["val_json"].read_text())
    assert len(val) == 6 and {"image", "text", "ref_id"} <= set(val[0])
    dets = json.loads(synth.files["dets"].read_text())
    for entry in val:
        image_id = str(int(Path(entry["image"]).stem.rsplit("_", 1)[1]))
        box = synth.boxes[entry["ref_id"]]
        assert box in dets[image_id]  # the GT is one of the proposals
        color = next(c for c in COLORS if c in entry["text"].split())
        with Image.open(synth.image_root / entry["image"]) as im:
            centre = im.convert("RGB").getpixel((int(box[0] + box[2] / 2), int(box[1] + box[3] / 2)))
        assert max(abs(a - b) for a, b in zip(centre, COLORS[color])) <= 12  # the named shape is in its box
