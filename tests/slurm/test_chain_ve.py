"""A downstream task's chain on the real one-node SLURM, submitted with `albef slurm submit`:

prep array (`albef prep snli_ve` on generated SNLI-VE: a train split and a held-out split) -> prep
check -> `albef finetune ve` (tiny CPU config, a few steps, validated each epoch: a `best` tag) ->
`albef evaluate ve` array on the held-out split. Every job must end COMPLETED and the eval JSON must
be the `best` checkpoint's accuracy on every held-out hypothesis. The task name travels as the
sbatch scripts' argument (finetune.sbatch / eval.sbatch), the prep folders through `feeds`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.slurm.submit import format_status, wait

from pipeline_testutils import tiny_pretrain_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def ve_chain_settings(tmp_path: Path) -> tuple[Path, int]:
    """Settings for prep -> finetune ve -> eval ve; returns the file and the held-out hypotheses."""
    from data_prep.synthetic_ve import write_synthetic_ve

    synth = write_synthetic_ve(tmp_path / "raw", splits={"train": 24, "heldout": 8}, image_size=64, per_label=1)
    prep_options = {"image_root": str(synth.image_root), "image_size": 64, "threads": 4, "samples_per_shard": 64}
    settings = {
        "run_dir": str(tmp_path / "run"),
        "albef_command": f"{sys.executable} -m pipeline.cli",
        "prep": {
            "resources": {"cpus_per_task": 1, "time": "00:20:00"},
            "sources": [
                {
                    "name": "ve_train",
                    "source": "snli_ve",
                    "inputs": [str(synth.jsonl["train"])],
                    "options": prep_options,
                    "feeds": ["finetune:data.train"],
                },
                {
                    "name": "ve_heldout",
                    "source": "snli_ve",
                    "inputs": [str(synth.jsonl["heldout"])],
                    "options": prep_options,
                    "feeds": ["finetune:data.val", "eval"],
                },
            ],
        },
        "finetune": {
            "task": "ve",
            "config": "ve_tiny_cpu.yaml",
            "checkpoint": str(tiny_pretrain_checkpoint(tmp_path / "init.pth")),
            "resources": {"cpus_per_task": 1, "time": "00:20:00"},
            # 32 hypotheses an epoch at batch 16: 2 steps, validation (and `best`) at steps 2 and 4.
            "overrides": {"train.epochs": 2, "data.samples_per_epoch": 32, "logging.progress_bar": "off"},
            "preempt_grace_s": 60,
        },
        "eval": {  # task: fine-tuning's (ve)
            "resources": {"cpus_per_task": 1, "time": "00:20:00"},
            "checkpoints": ["finetune"],
            "overrides": {"num_workers": 0, "device": "cpu"},
        },
    }
    path = tmp_path / "slurm_ve.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path, synth.pairs["heldout"]


@pytest.mark.timeout(900)
def test_ve_chain_prep_finetune_eval_completes(slurm_cluster, tmp_path: Path) -> None:
    config, heldout_pairs = ve_chain_settings(tmp_path)
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "slurm", "submit", "--stages=prep,finetune,eval", f"--config={config}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = dict(re.findall(r"^\s+(prep|prep_check|finetune|eval)\s+(\d+)\s", proc.stdout, re.M))
    assert list(ids) == ["prep", "prep_check", "finetune", "eval"], proc.stdout

    infos = wait(run, poll_s=2.0, timeout_s=800)
    print(f"\nve chain: submit -> all final in {time.monotonic() - t0:.0f} s\n{format_status(infos)}")
    assert all(i.state == "COMPLETED" for i in infos), format_status(infos)
    assert sorted(i.job_id for i in infos if i.stage == "prep") == [f"{ids['prep']}_{k}" for k in (1, 2)]

    summary = json.loads((run / "slurm" / "prep_summary.json").read_text())
    assert summary["ok"] and [s["source"] for s in summary["slices"]] == ["snli_ve", "snli_ve"]
    finetune_log = (run / "logs" / f"albef-finetune-{ids['finetune']}.out").read_text()
    assert "task ve; USR1 trap set" in finetune_log, finetune_log[-3000:]
    assert (run / "finetune" / "checkpoints" / "best").is_dir()
    eval_log = (run / "logs" / f"albef-eval-{ids['eval']}_1.out").read_text()
    assert " evaluate ve --checkpoint=" in eval_log, eval_log[-3000:]

    (result,) = (run / "finetune" / "eval").glob("ve_*.json")
    report = json.loads(result.read_text())
    assert report["checkpoint"] == str(run / "finetune" / "checkpoints" / "best")
    assert report["data"] == str(run / "prep" / "ve_heldout")
    assert report["num_pairs"] == heldout_pairs == 24 and report["weights"]["missing"] == []
    assert 0.0 <= report["accuracy"] <= 100.0
    assert report["checkpoint_step"] in (2, 4)  # a validated step of the 4
