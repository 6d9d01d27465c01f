"""Clear errors with the documented exit code (issue 12, item 8), through the real CLI: a YAML syntax
error, a `!!python/object` tag, duplicate keys, a non-finite number, and a bad `.pth` given to
finetune / evaluate / export each exit 2 with one line naming the file or the key, no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE

from pipeline_testutils import assert_one_error_line, run_cli

pytestmark = [pytest.mark.slow]

BAD_YAML = {
    "syntax": "train:\n  batch_size: [8\n",
    "python_tag": "train: !!python/object/apply:os.system ['touch PWNED']\n",
    "duplicate_keys": "train:\n  batch_size: 8\noptim:\n  lr: 1.0e-3\ntrain:\n  seed: 3\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_YAML))
def test_bad_yaml_exits_2_naming_the_file(tmp_path: Path, kind: str) -> None:
    config = tmp_path / f"{kind}.yaml"
    config.write_text(BAD_YAML[kind])
    proc = run_cli(["pretrain", "--config", str(config), "--output_dir", str(tmp_path / "run")])
    line = assert_one_error_line(proc, CONFIG_ERROR_EXIT_CODE, str(config))
    assert kind != "duplicate_keys" or "duplicate key 'train'" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "PWNED").exists()


def test_non_finite_override_exits_2_naming_the_key(tmp_path: Path) -> None:
    args = ["pretrain", "--config", "pretrain_tiny_cpu", "--output_dir", str(tmp_path / "run"), "--optim.lr=inf"]
    assert_one_error_line(run_cli(args), CONFIG_ERROR_EXIT_CODE, "config key 'optim.lr'", "finite")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["finetune", "evaluate", "export"])
def test_bad_pth_exits_2_naming_the_file(tmp_path: Path, synthetic_splits, stage: str) -> None:
    bad = tmp_path / "ALBEF_4M.pth"
    bad.write_bytes(b"\x80\x02}q\x00 truncated download")
    out = tmp_path / "out"
    splits = synthetic_splits(n_train=8, n_test=4, image_size=16)
    args = {
        "finetune": ["finetune", "retrieval", "--config", "retrieval_tiny_cpu", "--checkpoint", str(bad)]
        + ["--output_dir", str(out), f"--data.train=[{splits['train']}]"],
        "evaluate": ["evaluate", "retrieval", "--checkpoint", str(bad), "--data", str(splits["test"])]
        + ["--output_dir", str(out), "--device=cpu"],
        "export": ["export", "--checkpoint", str(bad), "--output", str(out / "albef.safetensors")],
    }[stage]
    assert_one_error_line(run_cli(args), CONFIG_ERROR_EXIT_CODE, "config key 'checkpoint'", str(bad))
    assert not out.exists()
