"""`albef export` writes safetensors by default (issue 12, item 11), with the model config beside it
and a model card, and every stage that takes `--checkpoint` reads the export.

On a copy of the session's tiny 2-step pretraining run: evaluate it (the run folder gets an eval
report), export it through the CLI, then evaluate and fine-tune from the `.safetensors` file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.runtime import checkpoint
from pipeline.runtime.io import read_checkpoint, torch_load_weights_only
from pipeline.weights.export import export

from pipeline_testutils import run_cli

pytestmark = [pytest.mark.slow]


def _evaluate(ckpt: Path, data: Path, out: Path) -> dict:
    args = ["evaluate", "retrieval", "--checkpoint", str(ckpt), "--data", str(data), "--output_dir", str(out)]
    proc = run_cli([*args, "--k_test", "4", "--num_workers=0", "--device=cpu"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (report,) = (out / "eval").glob("*.json")
    return json.loads(report.read_text())


def test_safetensors_export_with_config_and_card_feeds_every_stage(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    from_run = _evaluate(run, tiny_run["test"], run)  # RUN/eval/<report>.json, shown on the card

    out = tmp_path / "export" / "albef_tiny.safetensors"
    proc = run_cli(["export", "--checkpoint", str(run), "--output", str(out)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["albef_tiny.json", "albef_tiny.md", out.name]

    # Weights: every tensor of the module, as trained (an fp32 run), contiguous, nothing else.
    ckpt_dir, tag = checkpoint.locate(run)
    module = torch_load_weights_only(ckpt_dir / tag / checkpoint.MODEL_STATES)["module"]
    tensors = load_file(str(out))
    assert set(tensors) == set(module)
    assert all(torch.equal(tensors[k], module[k]) and tensors[k].is_contiguous() for k in module)

    side = json.loads(out.with_suffix(".json").read_text())
    assert side["model_config"] == module_config(run)
    assert side["meta"]["step"] == 2 and side["meta"]["format"] == "safetensors"
    loaded = read_checkpoint(out)
    assert loaded.model_config == side["model_config"] and loaded.step == 2

    card = out.with_suffix(".md").read_text()
    patch = side["model_config"]["vision"]["patch_size"]
    assert f"- vision: ViT, 32 px, patch {patch}" in card and "optimizer steps: 2" in card
    assert f"| train | `{tiny_run['train']}` | synthetic | train | 32 |" in card  # manifest with its counts
    assert "random initialisation" in card
    r_mean = from_run["metrics"]["itm"]["r_mean"]
    assert "| itm |" in card and f"{r_mean:.2f} |" in card  # final metrics from RUN/eval

    # Every stage that takes --checkpoint reads it: the same weights give the same recalls ...
    from_export = _evaluate(out, tiny_run["test"], tmp_path / "eval_export")
    assert from_export["metrics"] == from_run["metrics"] and from_export["checkpoint_step"] == 2
    # ... and fine-tuning starts from it.
    ft = ["finetune", "retrieval", "--config", "retrieval_tiny_cpu", "--checkpoint", str(out)]
    ft += ["--output_dir", str(tmp_path / "ft"), f"--data.train=[{tiny_run['train']}]", "--model.image_res=32"]
    proc = run_cli([*ft, "--train.max_steps=2", "--data.num_workers=0", "--logging.progress_bar=off"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "retrieval weights loaded" in proc.stdout + proc.stderr


def module_config(run: Path) -> dict:
    ckpt_dir, tag = checkpoint.locate(run)
    return torch_load_weights_only(ckpt_dir / tag / checkpoint.MODEL_STATES)["model_config"]


def test_pth_stays_an_option_and_foreign_sidecars_are_kept(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    pth = Path(export(str(tiny_run["run"]), str(tmp_path / "albef.pth"), "ours", "pth"))
    data = torch.load(pth, map_location="cpu", weights_only=True)
    assert data["meta"]["format"] == "pth" and data["model_config"] == module_config(tiny_run["run"])
    again = read_checkpoint(str(pth))
    assert set(again.state_dict) == set(data["model"])

    (tmp_path / "manifest.json").write_text('{"format_version": 1}')  # not an export's sidecar
    with pytest.raises(ConfigError, match="'output'.*manifest.json exists and is not an export's"):
        export(str(tiny_run["run"]), str(tmp_path / "manifest.safetensors"))
    assert not (tmp_path / "manifest.safetensors").exists()
    assert (tmp_path / "manifest.json").read_text() == '{"format_version": 1}'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
