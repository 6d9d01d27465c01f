"""NLVR2's whole chain on the real one-node SLURM, submitted with `albef slurm submit` as one dependency chain:

prep array (`albef prep generic` on the single-image captions of generated NLVR2 pictures, `albef prep nlvr2`
on a train split and a held-out split) -> prep check -> `albef pretrain` (tiny, from scratch) -> `ta`
(`albef pretrain --config nlvr_ta_tiny_cpu --checkpoint RUN/pretrain`) -> `albef finetune nlvr --checkpoint
RUN/ta` (validated each epoch: a `best` tag) -> `albef evaluate nlvr` on the held-out split. Neither the ta
nor the finetune stage names a checkpoint: the submitter's defaults chain them (pipeline/slurm/submit.py).
A few steps each: the test proves the wiring and the artifacts, the stage tests prove the learning.
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

from pipeline.config.paths import CONFIG_DIR
from pipeline.runtime.io import read_checkpoint
from pipeline.slurm.submit import SUBMISSION_FILE, format_status, wait

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STAGES = ["prep", "prep_check", "pretrain", "ta", "finetune", "eval"]


def nlvr_chain_settings(tmp_path: Path) -> tuple[Path, int]:
    """Settings for prep -> pretrain -> ta -> finetune nlvr -> eval nlvr; returns the file and the
    held-out sentences. The pictures' captions (generic list, local images) feed pretraining and TA."""
    from data_prep.synthetic_nlvr import write_synthetic_nlvr

    synth = write_synthetic_nlvr(tmp_path / "raw", splits={"train": 16, "heldout": 8}, image_size=64)
    captions = tmp_path / "raw" / "captions.jsonl"  # 32 pictures x 3 captions
    rows = [{"url": str(p.relative_to(synth.image_root)), "caption": list(c)} for p, c in synth.image_captions["train"]]
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    nlvr_options = {"image_root": str(synth.image_root), "image_size": 64, "threads": 4, "samples_per_shard": 64}
    resources = {"cpus_per_task": 1, "time": "00:20:00"}
    quiet = {"logging.progress_bar": "off", "logging.log_every_steps": 1}
    settings = {
        "run_dir": str(tmp_path / "run"),
        "albef_command": f"{sys.executable} -m pipeline.cli",
        "prep": {
            "resources": resources,
            "sources": [
                {
                    "name": "captions",
                    "source": "generic",
                    "inputs": [str(captions)],
                    "options": {"image_root": str(synth.image_root), "image_size": 64, "threads": 4},
                    "feeds": ["pretrain:data.train", "ta:data.train"],
                },
                {
                    "name": "nlvr_train",
                    "source": "nlvr2",
                    "inputs": [str(synth.jsonl["train"])],
                    "options": nlvr_options,
                    "feeds": ["finetune:data.train"],
                },
                {
                    "name": "nlvr_heldout",
                    "source": "nlvr2",
                    "inputs": [str(synth.jsonl["heldout"])],
                    "options": nlvr_options,
                    "feeds": ["finetune:data.val", "eval"],
                },
            ],
        },
        "pretrain": {  # 96 image-caption pairs, batch 32: 2 steps, the last one saved
            "config": "pretrain_tiny_cpu.yaml",
            "resources": resources,
            "overrides": {"train.max_steps": 2, "train.save_every_steps": 2, **quiet},
            "preempt_grace_s": 60,
        },
        "ta": {  # checkpoint: none given, so this run's pretrain folder
            "config": "nlvr_ta_tiny_cpu.yaml",
            "resources": resources,
            "overrides": {"train.max_steps": 2, "train.batch_size": 8, "train.save_every_steps": 2, **quiet},
            "preempt_grace_s": 60,
        },
        "finetune": {  # checkpoint: none given, so this run's ta folder
            "task": "nlvr",
            "config": "nlvr_tiny_cpu.yaml",
            "resources": resources,
            # 32 training sentences an epoch at batch 16: 2 steps, validation (and `best`) at steps 2 and 4.
            "overrides": {"train.epochs": 2, **quiet},
            "preempt_grace_s": 60,
        },
        "eval": {  # task: fine-tuning's (nlvr)
            "resources": resources,
            "checkpoints": ["finetune"],
            "overrides": {"num_workers": 0, "device": "cpu"},
        },
    }
    path = tmp_path / "slurm_nlvr.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path, synth.records["heldout"]


def script_args(job: dict, script: str) -> list[str]:
    """The arguments after `script` in a submitted job's sbatch argv (submission.json)."""
    (i,) = [k for k, word in enumerate(job["argv"]) if word.endswith(script)]
    return job["argv"][i + 1 :]


@pytest.mark.timeout(900)
def test_nlvr_chain_prep_pretrain_ta_finetune_eval_completes(slurm_cluster, tmp_path: Path) -> None:
    config, heldout_sentences = nlvr_chain_settings(tmp_path)
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "slurm", "submit", "--stages=prep,pretrain,ta,finetune,eval",
         f"--config={config}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in proc.stderr, proc.stderr  # e.g. finetune nlvr without ta
    ids = dict(re.findall(rf"^\s+({'|'.join(STAGES)})\s+(\d+)\s", proc.stdout, re.M))
    assert list(ids) == STAGES, proc.stdout

    # One dependency chain, each job after the one before; ta reads pretrain's run, finetune ta's.
    jobs = {j["name"]: j for j in json.loads((run / "slurm" / SUBMISSION_FILE).read_text())["jobs"]}
    assert [(j["name"], j["after"]) for j in jobs.values()] == list(zip(STAGES, [None, *STAGES[:-1]], strict=True))
    assert f"--checkpoint={run / 'pretrain'}" in script_args(jobs["ta"], "pretrain.sbatch")
    assert script_args(jobs["finetune"], "finetune.sbatch")[:4] == [
        "nlvr", str(run / "finetune"), str(CONFIG_DIR / "nlvr_tiny_cpu.yaml"), str(run / "ta")
    ]  # fmt: skip

    infos = wait(run, poll_s=2.0, timeout_s=800)
    print(f"\nnlvr chain: submit -> all final in {time.monotonic() - t0:.0f} s\n{format_status(infos)}")
    assert all(i.state == "COMPLETED" for i in infos), format_status(infos)
    assert sorted(i.job_id for i in infos if i.stage == "prep") == [f"{ids['prep']}_{k}" for k in (1, 2, 3)]

    summary = json.loads((run / "slurm" / "prep_summary.json").read_text())
    assert summary["ok"] and [s["source"] for s in summary["slices"]] == ["generic", "nlvr2", "nlvr2"]

    # Pretraining and TA: each committed its last step; TA holds the TA model, started from pretraining.
    for stage in ("pretrain", "ta"):
        assert (run / stage / "checkpoints" / "latest").read_text().strip() == "global_step2", stage
    ta = read_checkpoint(run / "ta")
    assert ta.step == 2 and "ta_head.weight" in ta.state_dict and "image_queue" not in ta.state_dict
    ta_log = (run / "logs" / f"albef-ta-{ids['ta']}.out").read_text()
    assert "momentum/queue tensors of the pre-training checkpoint unused" in ta_log, ta_log[-3000:]

    # Fine-tuning: NLVR from the TA run (its head left unused, no "WITHOUT the text-assignment epoch" warning);
    # validated each epoch: `best`.
    finetune_log = (run / "logs" / f"albef-finetune-{ids['finetune']}.out").read_text()
    assert "task nlvr; USR1 trap set" in finetune_log, finetune_log[-3000:]
    loaded = [line for line in finetune_log.splitlines() if "nlvr weights loaded" in line]
    assert len(loaded) == 1 and "'ta_head.weight'" in loaded[0], loaded  # only a TA run has the TA head
    assert "WITHOUT the text-assignment epoch" not in finetune_log, finetune_log[-3000:]
    assert (run / "finetune" / "checkpoints" / "best").is_dir()
    assert (run / "finetune" / "checkpoints" / "latest").read_text().strip() == "global_step4"
    eval_log = (run / "logs" / f"albef-eval-{ids['eval']}_1.out").read_text()
    assert " evaluate nlvr --checkpoint=" in eval_log, eval_log[-3000:]

    (result,) = (run / "finetune" / "eval").glob("nlvr_*.json")
    report = json.loads(result.read_text())
    assert report["checkpoint"] == str(run / "finetune" / "checkpoints" / "best")
    assert report["data"] == str(run / "prep" / "nlvr_heldout")
    assert report["num_pairs"] == heldout_sentences == 16 and report["weights"]["missing"] == []
    assert type(report["accuracy"]) in (int, float) and 0.0 <= report["accuracy"] <= 100.0
    assert report["checkpoint_step"] in (2, 4)  # a validated step of the 4
