"""On the real one-node SLURM: the cluster works, submissions chain, failures are reported."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.slurm.submit import NEVER_SATISFIED, SlurmSubmitError, format_status, status_command, submit, wait

from slurm_testutils import job_fields

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_cluster_runs_a_trivial_job(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "hello.out"
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            f"--output={out}",
            "--ntasks=2",
            "--wrap",
            "srun bash -c 'echo hello from rank $SLURM_PROCID'",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert sorted(out.read_text().split("\n")[:2]) == ["hello from rank 0", "hello from rank 1"]
    (fields,) = job_fields(job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0")


def _settings(tmp_path: Path, prep_input: Path, **pretrain: object) -> Path:
    (tmp_path / "pre.yaml").write_text("{}\n")
    settings = {
        "run_dir": str(tmp_path / "run"),
        "prep": {
            "resources": {"time": "00:05:00"},
            "sources": [
                {"name": "toy", "source": "cc3m", "inputs": [str(prep_input)], "feeds": ["pretrain:data.train"]}
            ],
        },
        "pretrain": {"config": str(tmp_path / "pre.yaml"), "resources": {"time": "00:05:00"}, **pretrain},
    }
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def test_failed_submission_cancels_what_was_submitted(slurm_cluster, tmp_path: Path) -> None:
    # prep is held (--begin) so it is certainly still pending; pretrain asks for a partition that
    # does not exist, so its sbatch fails after prep and prep_check were submitted.
    config = _settings(tmp_path, tmp_path / "in.tsv", resources={"sbatch_args": ["--partition=no_such_partition"]})
    with pytest.raises(SlurmSubmitError) as err:
        submit(
            stages="prep,pretrain", config=str(config), overrides={"prep.resources.sbatch_args": ["--begin=now+300"]}
        )
    message = str(err.value)
    assert "stage 'pretrain'" in message and "invalid partition" in message.lower()
    cancelled = message.split("cancelled the jobs already submitted: ")[1].split()
    assert len(cancelled) == 2  # prep array + prep_check
    for job_id in cancelled:
        assert {f["JobState"] for f in job_fields(job_id)} == {"CANCELLED"}
    assert not (tmp_path / "run" / "slurm" / "submission.json").exists()


def test_failing_stage_leaves_dependents_never_satisfied(
    slurm_cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_such_input.tsv"  # a real failure: `albef prep` exits non-zero on it
    jobs = submit(stages="prep,pretrain", config=str(_settings(tmp_path, missing)))
    printed = capsys.readouterr().out
    assert all(j.job_id and j.job_id in printed for j in jobs)
    assert "tensorboard --logdir" in printed

    infos = wait(tmp_path / "run", poll_s=1.0, timeout_s=300)
    by_stage = {i.stage: i for i in infos}
    assert by_stage["prep"].state == "FAILED" and by_stage["prep"].exit_code != "0:0"
    for stage in ("prep_check", "pretrain"):  # never ran: kill_invalid_depend cancels them
        assert (by_stage[stage].state, by_stage[stage].reason) == ("CANCELLED", NEVER_SATISFIED)
    # The same, read directly from the scheduler.
    (fields,) = job_fields(by_stage["pretrain"].job_id)
    assert fields["Reason"] == NEVER_SATISFIED
    report = format_status(infos)
    assert f"FAILED: prep job {by_stage['prep'].job_id}" in report
    assert "NEVER RAN (DependencyNeverSatisfied" in report and "pretrain" in report.splitlines()[-1]
    assert status_command(str(tmp_path / "run")) == 1
    assert "NEVER RAN" in capsys.readouterr().out
    # The failed task's log says why, naming the file.
    assert str(missing) in Path(by_stage["prep"].log).read_text()
