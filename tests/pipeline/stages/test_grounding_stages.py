"""Grounding stages end to end on the CPU: `albef prep refcoco+` (real img2dataset, images served on
127.0.0.1) -> `albef finetune grounding` -> `albef evaluate grounding --write_maps` on held-out
generated data, plus the stages' config errors.

What the slow test asserts, and why not more: a tiny ALBEF trained from scratch for ~150 steps on the
CPU lowers its retrieval loss but does not learn image-text alignment well enough for its Grad-CAM to
point at the named shape (measured: accuracy at the random-proposal rate, 1/3, see README). The
Grad-CAM, ranking and accuracy arithmetic is proven against the official code instead
(tests/pipeline/tasks/test_grounding.py, tests/model/heads/test_grounding_parity.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.http_server import FolderServer
from data_prep.synthetic_grounding import write_synthetic_grounding
from model.albef import build_albef
from model.config import ALBEFConfig
from pipeline.config import REPO_ROOT
from pipeline.stages.evaluate_grounding import evaluate_grounding
from pipeline.stages.finetune_grounding import finetune_grounding

from pipeline_testutils import tb_scalars


def _run(args: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    with open(log, "w") as fh:
        code = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT,
            timeout=900,
        ).returncode  # fmt: skip
    assert code == 0, log.read_text()[-4000:]


def _initial_checkpoint(path: Path) -> Path:
    """An exported-style pretraining checkpoint of the tiny ALBEF (random init)."""
    torch.manual_seed(0)
    cfg = ALBEFConfig.tiny(image_size=64, embed_dim=32, queue_size=64)
    torch.save({"model": build_albef(cfg).state_dict(), "model_config": cfg.to_dict()}, path)
    return path


def test_config_and_input_errors_exit_2(tmp_path: Path, capfd) -> None:
    ckpt = _initial_checkpoint(tmp_path / "init.pth")
    code = finetune_grounding("grounding_tiny_cpu", str(ckpt), str(tmp_path / "run"), overrides={"data.train": f"[{tmp_path}/no]"})  # fmt: skip
    assert code == 2 and not (tmp_path / "run").exists()
    assert "data.train[0]" in capfd.readouterr().err
    train = tmp_path / "train_prep"
    (train / "shards").mkdir(parents=True)
    (train / "manifest.json").write_text(json.dumps({"format_version": 1, "source": "refcoco+", "split": "train",
        "shards": [], "num_samples": 0, "num_captions": 0}))  # fmt: skip
    code = finetune_grounding("grounding_tiny_cpu", str(ckpt), str(tmp_path / "run"),
                              overrides={"data.train": f"[{train}]", "data.val": str(train)})  # fmt: skip
    assert code == 2 and not (tmp_path / "run").exists()
    assert "data.val" in capfd.readouterr().err
    code = finetune_grounding("grounding_tiny_cpu", str(ckpt), str(tmp_path / "run"), overrides={"eval.box_alpa": 1})
    assert code == 2 and "eval.box_alpa" in capfd.readouterr().err
    with pytest.raises(SystemExit) as exc:
        evaluate_grounding(str(tmp_path / "missing.pth"), str(tmp_path), str(tmp_path / "out"), {"device": "cpu"})
    assert exc.value.code == 2 and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:
        evaluate_grounding(str(ckpt), str(tmp_path), str(tmp_path / "out"), {"device": "cpu", "mode": "gradcam"})
    assert exc.value.code == 2 and "mode" in capfd.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_prep_finetune_evaluate_writes_maps(tmp_path: Path) -> None:
    synth = write_synthetic_grounding(tmp_path / "raw", splits={"train": 200, "testA": 12, "testB": 12})
    common = ["--image_size=64", "--processes=1", "--threads=4", "--samples_per_shard=128"]
    evaluation = ["--refs", str(synth.files["refs"]), "--instances", str(synth.files["instances"]),
                  "--dets", str(synth.files["dets"])]  # fmt: skip
    with FolderServer(synth.image_root) as server:
        for split, extra in (("train", []), ("test", evaluation)):
            _run(["prep", "refcoco+", "--input", str(synth.files[f"{split}_json"]), "--split", split,
                  "--image_root", server.base_url, "--output", str(tmp_path / split), *common, *extra],
                 tmp_path / f"prep_{split}.log")  # fmt: skip
    run = tmp_path / "ft"
    # data.val = the held-out test folder (one prep less; the test only needs validation to run).
    _run(
        ["finetune", "grounding", "--config", "grounding_tiny_cpu", "--checkpoint",
         str(_initial_checkpoint(tmp_path / "init.pth")), "--output_dir", str(run),
         f"--data.train=[{tmp_path / 'train'}]", f"--data.val={tmp_path / 'test'}", "--train.epochs=4",
         "--logging.progress_bar=off"],
        tmp_path / "ft.log",
    )  # fmt: skip
    scalars = tb_scalars(run / "tensorboard")
    losses, val = [v for _, v in scalars["train/loss_total"]], scalars["val/accuracy"]
    assert len(losses) >= 6 and len(val) == 4  # 600 pairs / 32 = 18 steps per epoch, logged every 10
    assert min(losses[-3:]) < losses[0] - 0.2, losses  # the retrieval losses fall
    _run(
        ["evaluate", "grounding", "--checkpoint", str(run), "--data", str(tmp_path / "test"), "--output_dir",
         str(run), "--num_workers=0", "--device=cpu", "--write_maps=5"],
        tmp_path / "eval.log",
    )  # fmt: skip
    report = json.loads((run / "eval" / "grounding_refcoco__test.json").read_text())
    assert report["num_refs"] == {"testA": 36, "testB": 36} and report["num_images"] == 24
    assert report["chance"] == pytest.approx({"testA": 100 / 3, "testB": 100 / 3})  # 3 proposals, one right
    assert report["upper_bound"] == {"testA": 100.0, "testB": 100.0} and report["weights"]["missing"] == []
    assert report["block"] == 3 and report["mode"] == "itm"  # the tiny model's 2nd of 2 fusion layers
    assert set(report["accuracy"]) == {"testA", "testB"} and 0.0 <= report["accuracy_all"] <= 100.0
    maps = sorted((run / "eval" / "grounding_refcoco__test_maps").glob("*.png"))
    assert len(maps) == 5 and all(p.stat().st_size > 0 for p in maps)
    written = tb_scalars(run / "tensorboard")["eval/grounding_refcoco__test/accuracy/testA"]
    assert written == [(report["checkpoint_step"], pytest.approx(report["accuracy"]["testA"]))]
