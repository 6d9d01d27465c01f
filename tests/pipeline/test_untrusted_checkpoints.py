"""No code from checkpoints (issue 12, item 1): a pickled `__reduce__` payload planted in every file
the pipeline loads never runs, and each command fails cleanly.

Loading paths, each through the real CLI: `evaluate retrieval`, `finetune retrieval` and `export`
given a run folder whose model states carry the payload; the same three given an official-style
`.pth` that carries it; `--resume` of a run whose model states, or whose optimizer shard, carry it.
The payload creates a marker file when unpickled; `test_the_payload_is_live` shows that an
unrestricted `torch.load` would indeed run it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.runtime import checkpoint
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE, FAILED_EXIT_CODE
from pipeline.runtime.io import torch_load_weights_only

from pipeline_testutils import assert_one_error_line, run_cli

pytestmark = [pytest.mark.slow]

OPTIM_SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickling it calls open(marker, "w"): the harmless stand-in for an attacker's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """Rewrite a torch file with the payload inside it (in `module` for DeepSpeed model states).

    The tag's commit record is rewritten to the new sizes too (an attacker controls the whole
    folder), so what refuses the payload is the weights-only reader, not the size check."""
    data = torch_load_weights_only(path)
    if isinstance(data.get("module"), dict):
        data["module"] = {**data["module"], "payload": Payload(marker)}
    else:
        data["payload"] = Payload(marker)
    torch.save(data, path)
    record = path.parent / checkpoint.COMMIT_FILE
    if record.is_file():
        commit = json.loads(record.read_text())
        commit["files"][path.name] = path.stat().st_size
        record.write_text(json.dumps(commit))


def _tag_dir(run: Path) -> Path:
    ckpt_dir, tag = checkpoint.locate(run)
    return ckpt_dir / tag


@pytest.fixture
def planted(tiny_run: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Copies of the tiny run (payload in its model states, or in its optimizer shard) and an
    official-style .pth with the real weights and the payload."""
    marker = tmp_path / "PWNED"
    states_run, optim_run = tmp_path / "run_states", tmp_path / "run_optim"
    for run in (states_run, optim_run):
        shutil.copytree(tiny_run["run"], run)
    plant(_tag_dir(states_run) / checkpoint.MODEL_STATES, marker)
    plant(_tag_dir(optim_run) / OPTIM_SHARD, marker)
    official = tmp_path / "ALBEF_like.pth"
    module = torch_load_weights_only(_tag_dir(tiny_run["run"]) / checkpoint.MODEL_STATES)["module"]
    torch.save({"model": module, "payload": Payload(marker)}, official)
    return {"marker": marker, "states_run": states_run, "optim_run": optim_run, "pth": official, **tiny_run}


def test_the_payload_is_live(planted: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.pth"
    shutil.copy(planted["pth"], copy)
    torch.load(copy, map_location="cpu", weights_only=False)  # what an unrestricted load does
    assert planted["marker"].exists()


def _commands(p: dict[str, Path], out: Path) -> dict[str, tuple[list[str], int]]:
    ev = ["evaluate", "retrieval", "--data", str(p["test"]), "--output_dir", str(out), "--k_test", "4"]
    ev += ["--num_workers=0", "--device=cpu"]
    ft = ["finetune", "retrieval", "--config", "retrieval_tiny_cpu", "--output_dir", str(out)]
    ft += [f"--data.train=[{p['train']}]", "--model.image_res=32", "--train.max_steps=2"]
    resume = ["pretrain", "--config", "pretrain_tiny_cpu", f"--data.train=[{p['train']}]", "--model.image_res=32"]
    resume += ["--data.num_workers=0", "--train.max_steps=4", "--logging.progress_bar=off"]
    resume += ["--deepspeed.config=ds_configs/cpu_zero2.json"]  # tiny_run's (an optimizer partition file)
    return {
        "evaluate_run": ([*ev, "--checkpoint", str(p["states_run"])], CONFIG_ERROR_EXIT_CODE),
        "finetune_run": ([*ft, "--checkpoint", str(p["states_run"])], CONFIG_ERROR_EXIT_CODE),
        "export_run": (["export", "--checkpoint", str(p["states_run"]), "--output", str(out / "x.safetensors")], 2),
        "evaluate_pth": ([*ev, "--checkpoint", str(p["pth"])], CONFIG_ERROR_EXIT_CODE),
        "finetune_pth": ([*ft, "--checkpoint", str(p["pth"])], CONFIG_ERROR_EXIT_CODE),
        "export_pth": (["export", "--checkpoint", str(p["pth"]), "--output", str(out / "x.safetensors")], 2),
        # --resume: DeepSpeed's own loader, redirected to the weights-only reader (exit 1: found after start-up)
        "resume_model_states": ([*resume, "--output_dir", str(p["states_run"]), "--resume", "auto"], FAILED_EXIT_CODE),
        "resume_optimizer_shard": (
            [*resume, "--output_dir", str(p["optim_run"]), "--resume", "auto"],
            FAILED_EXIT_CODE,
        ),
    }


@pytest.mark.parametrize(
    "path",
    [
        "evaluate_run",
        "finetune_run",
        "export_run",
        "evaluate_pth",
        "finetune_pth",
        "export_pth",
        "resume_model_states",
        "resume_optimizer_shard",
    ],
)
def test_planted_payload_never_runs(planted: dict[str, Path], tmp_path: Path, path: str) -> None:
    args, code = _commands(planted, tmp_path / "out")[path]
    proc = run_cli(args)
    line = assert_one_error_line(proc, code, "cannot read as a weights-only torch file", "io.open")
    assert code == FAILED_EXIT_CODE or "config key 'checkpoint'" in line
    assert not planted["marker"].exists(), f"the payload ran via {path}"
    assert not (tmp_path / "out").exists() or path.startswith("resume")  # refused before writing
