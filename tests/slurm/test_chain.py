"""The demo-sized chain on the real one-node SLURM, submitted with `albef slurm submit`:

prep array (3 tasks: two chunks of the train list + the test split) -> prep check -> pretrain
(2 ranks via srun, SIGUSR1 mid-run -> checkpoint -> requeue -> resumed run finishes) -> fine-tune
(validated every epoch: a `best` tag) -> eval array (fine-tuned `best` + zero-shot). Every job must
end COMPLETED with its artifacts.

The cluster runs as a real one does (slurm/local_cluster.sh): SLURM's default MinJobAge (finished
jobs leave scontrol after 300 s, so waiting reads the completion log) and KillOnBadExit=1. Rank 0
of pretraining lingers 120 s after a non-zero exit (tests/slurm/slow_rank_exit.sh), so on preemption rank
1's exit 75 gets rank 0 killed and srun reports the kill: the requeue must come from the marker.
The submitting shell has stray RANK/WORLD_SIZE/MASTER_ADDR (jobs get it via --export=ALL): the
sbatch scripts must drop them.

The preemption is delivered inside the chain rather than in a separate pretraining job: it also
proves that dependents wait through a requeue, and it saves a second DeepSpeed start-up in CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.retrieval.rerank import SCORE_NAMES
from pipeline.slurm.submit import format_status, wait

from slurm_testutils import job_fields, wait_for_file_text

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_inputs(root: Path) -> tuple[list[Path], Path, Path]:
    """Synthetic images + Karpathy json, the train list cut into two chunks (one prep task each)."""
    from data_prep.synthetic import write_synthetic

    synth = write_synthetic(root, n_train=96, n_test=24, image_size=64, seed=0)
    images = json.loads(synth.karpathy_json.read_text())["images"]
    chunks = []
    for i, part in enumerate((images[: len(images) // 2], images[len(images) // 2 :])):
        path = root / f"chunk{i}.json"
        path.write_text(json.dumps({"dataset": "synthetic", "images": part}))
        chunks.append(path)
    return chunks, synth.karpathy_json, root


def chain_settings(tmp_path: Path) -> Path:
    """The bundled slurm_demo.yaml with this test's inputs and run folder."""
    chunks, full, image_root = make_inputs(tmp_path / "inputs")
    settings = yaml.safe_load((REPO_ROOT / "pipeline" / "configs" / "slurm_demo.yaml").read_text())
    settings["run_dir"] = str(tmp_path / "run")
    wrapper = REPO_ROOT / "tests" / "slurm" / "slow_rank_exit.sh"
    settings["albef_command"] = f"bash {wrapper} {sys.executable} -m pipeline.cli"
    common = {"image_root": str(image_root), "image_size": 64, "threads": 4}
    train, test = settings["prep"]["sources"]
    train.update(inputs=[str(p) for p in chunks], options={"split": "train", **common})
    test.update(inputs=[str(full)], options={"split": "test", **common}, feeds=["eval", "finetune:data.val"])
    # Long enough to be signalled mid-run after the first checkpoint, short enough for CI.
    settings["pretrain"]["overrides"] = {
        "train.max_steps": 16,
        "train.save_every_steps": 3,
        "logging.log_every_steps": 1,
    }
    # 3 steps per epoch: validation (and the `best` tag) at steps 3 and 6.
    settings["finetune"]["overrides"] = {**settings["finetune"]["overrides"], "data.samples_per_epoch": 96}
    path = tmp_path / "slurm_chain.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


@pytest.mark.timeout(2400)
def test_demo_chain_with_preempted_pretrain_completes(slurm_cluster, tmp_path: Path) -> None:
    config = chain_settings(tmp_path)
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "slurm",
            "submit",
            "--stages=prep,pretrain,finetune,eval",
            f"--config={config}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "RANK": "3", "WORLD_SIZE": "7", "LOCAL_RANK": "1", "MASTER_ADDR": "stray.invalid"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = dict(re.findall(r"^\s+(prep|prep_check|pretrain|finetune|eval)\s+(\d+)\s", proc.stdout, re.M))
    assert list(ids) == ["prep", "prep_check", "pretrain", "finetune", "eval"], proc.stdout
    assert f"tensorboard --logdir {run}" in proc.stdout

    # Preempt pretraining once both ranks train (a first checkpoint exists) and the trap is set.
    pretrain_log = run / "logs" / f"albef-pretrain-{ids['pretrain']}.out"
    wait_for_file_text(pretrain_log, "USR1 trap set", timeout_s=900)
    deadline = time.monotonic() + 600
    while not (run / "pretrain" / "checkpoints" / "latest").exists():
        assert time.monotonic() < deadline, pretrain_log.read_text()[-3000:]
        (fields,) = job_fields(ids["pretrain"])
        assert fields["JobState"] in ("PENDING", "RUNNING"), pretrain_log.read_text()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", ids["pretrain"]], check=True)

    infos = wait(run, poll_s=2.0, timeout_s=1500)
    elapsed = time.monotonic() - t0
    print(f"\ndemo chain: submit -> all final in {elapsed:.0f} s\n{format_status(infos)}")
    assert all(i.state == "COMPLETED" for i in infos), format_status(infos)
    assert sorted(i.job_id for i in infos if i.stage == "prep") == [f"{ids['prep']}_{k}" for k in (1, 2, 3)]
    assert len([i for i in infos if i.stage == "eval"]) == 2

    # Pretraining: preempted once, checkpoint at the stop step, requeued, resumed there, finished.
    (pre,) = [i for i in infos if i.stage == "pretrain"]
    assert pre.restarts == 1 or pre.reason == "(completion log)", format_status(infos)
    log = pretrain_log.read_text()
    stopped = re.search(r"preempted: checkpoint saved at step (\d+), exiting 75", log)
    assert stopped, log[-3000:]
    requeued = re.search(r"srun exit (\d+)\); requeueing job", log)
    assert requeued and f"resumed at step {stopped.group(1)} " in log, log[-3000:]
    assert requeued.group(1) != "75", log[-3000:]  # rank 0 was killed: only the marker told
    marker = run / "pretrain" / "checkpoints" / f".preempted.{ids['pretrain']}.0"
    assert json.loads(marker.read_text())["step"] == int(stopped.group(1))
    assert f"job {ids['pretrain']} restart 1 on" in log
    assert "finished: 16 steps" in log
    assert (run / "pretrain" / "checkpoints" / "latest").read_text().strip() == "global_step16"
    assert list((run / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))

    # Prep: three slices checked and summed; fine-tune and eval artifacts.
    summary = json.loads((run / "slurm" / "prep_summary.json").read_text())
    assert summary["ok"] and len(summary["slices"]) == 3
    assert summary["num_samples"] == 96 + 24
    assert (run / "finetune" / "checkpoints" / "latest").is_file()
    for folder, evaluated in (("finetune", "finetune/checkpoints/best"), ("pretrain", "pretrain")):
        results = list((run / folder / "eval").glob("retrieval_*_test.json"))
        assert len(results) == 1, f"{folder}: {results}"
        report = json.loads(results[0].read_text())
        assert report["checkpoint"] == str(run / evaluated)
        metrics = report["metrics"]
        for score in SCORE_NAMES:
            assert 0.0 <= metrics[score]["r_mean"] <= 100.0
