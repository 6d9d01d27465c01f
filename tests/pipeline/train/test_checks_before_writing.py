"""Errors found before anything is written (issue 12, item 5): too few samples for the batch, a
malformed manifest, a fine-tuning checkpoint that cannot be read or does not fit. Each exits 2 with
one line naming the key, and an existing run folder (a real run's config.yaml and TensorBoard
events) is left exactly as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import pytest
import torch

from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE
from pipeline.stages.finetune_retrieval import finetune_retrieval
from pipeline.stages.pretrain import pretrain


@pytest.fixture
def existing_run(tmp_path: Path) -> Path:
    """A run folder as a real run left it."""
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "config.yaml").write_text("# resolved config; git abc\ntrain:\n  batch_size: 64\n")
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"\x00" * 64)
    past = 1_000_000_000
    for path in (run / "config.yaml", run / "tensorboard" / "events.out.tfevents.1.host"):
        os.utime(path, (past, past))
    return run


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def _assert_untouched(run: Path, before: dict[str, tuple[bytes, int]]) -> None:
    assert _snapshot(run) == before
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "tensorboard"]


def _one_error_line(err: str, key: str) -> None:
    lines = [line for line in err.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and f"config key '{key}'" in lines[0] and "Traceback" not in err, err


def test_too_few_samples_for_the_batch(existing_run: Path, train_shards, capfd) -> None:
    data = train_shards(n_train=8, per_shard=8, image_size=16)
    before = _snapshot(existing_run)
    overrides = {"data.train": f"[{data}]", "train.batch_size": 64}  # 8 images x 3 captions = 24 pairs
    assert pretrain("pretrain_tiny_cpu", str(existing_run), overrides=overrides) == CONFIG_ERROR_EXIT_CODE
    _one_error_line(capfd.readouterr().err, "train.batch_size")
    _assert_untouched(existing_run, before)


@pytest.mark.parametrize(
    "manifest",
    ["{not json", json.dumps({"format_version": 1, "shards": "oops"}), json.dumps({"format_version": 7, "shards": []})],
)
def test_malformed_manifest(existing_run: Path, tmp_path: Path, manifest: str, capfd) -> None:
    data = tmp_path / "prep"
    data.mkdir()
    (data / "manifest.json").write_text(manifest)
    before = _snapshot(existing_run)
    assert pretrain("pretrain_tiny_cpu", str(existing_run), overrides={"data.train": f"[{data}]"}) == 2
    _one_error_line(capfd.readouterr().err, "data.train")
    _assert_untouched(existing_run, before)


@pytest.mark.parametrize("kind", ["garbage", "not_weights_only", "does_not_fit", "empty_safetensors"])
def test_unreadable_finetune_checkpoint(existing_run: Path, synthetic_splits, tmp_path: Path, kind: str, capfd) -> None:
    splits = synthetic_splits(n_train=16, n_test=0, image_size=16)
    ckpt = tmp_path / ("init.safetensors" if kind == "empty_safetensors" else "init.pth")
    if kind == "garbage":
        ckpt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    elif kind == "not_weights_only":
        torch.save({"model": {"w": torch.zeros(2)}, "extra": PurePosixPath("x")}, ckpt)
    elif kind == "does_not_fit":
        torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1, 1, 3)}}, ckpt)
    else:
        ckpt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    before = _snapshot(existing_run)
    code = finetune_retrieval(
        "retrieval_tiny_cpu", str(ckpt), str(existing_run), overrides={"data.train": f"[{splits['train']}]"}
    )
    assert code == CONFIG_ERROR_EXIT_CODE
    err = capfd.readouterr().err
    _one_error_line(err, "checkpoint")
    assert str(ckpt) in err
    _assert_untouched(existing_run, before)


def test_evaluate_checkpoint_that_does_not_fit(synthetic_splits, tmp_path: Path, capfd) -> None:
    from model.albef import build_albef
    from model.config import ALBEFConfig
    from pipeline.stages.evaluate_retrieval import evaluate_retrieval

    config = ALBEFConfig.tiny()
    state = build_albef(config).state_dict()
    del state["visual_encoder.cls_token"]
    ckpt = tmp_path / "partial.pth"
    torch.save({"model": state, "model_config": config.to_dict()}, ckpt)
    splits = synthetic_splits(n_train=4, n_test=4, image_size=16)
    out = tmp_path / "eval_out"
    with pytest.raises(SystemExit) as info:
        evaluate_retrieval(str(ckpt), str(splits["test"]), str(out), overrides={"device": "cpu"})
    assert info.value.code == CONFIG_ERROR_EXIT_CODE and not out.exists()
    err = capfd.readouterr().err
    _one_error_line(err, "checkpoint")
    assert "missing ['visual_encoder.cls_token']" in err
