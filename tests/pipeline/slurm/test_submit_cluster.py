"""The submitter against a real cluster's rules, without one: fake `scontrol`/`sacct` on the PATH.

Covers what a 4 x 8 GPU cluster needs (issue 15) and the task-list safety of issue 12: tasks per
node = GPUs per node, CPU jobs without the GPU site options, eval of fine-tuning's `best`, no
second chain into a live run folder, status after scontrol forgot a job (sacct, then the job
completion log), a bounded wait, and no TAB/newline in anything that reaches a task list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.slurm.submit import (
    DEFAULT_WAIT_TIMEOUT_S,
    SUBMISSION_FILE,
    format_status,
    query_job,
    status_command,
    submit,
    submit_command,
    wait,
)


def settings_file(tmp_path: Path, **extra: object) -> Path:
    (tmp_path / "pre.yaml").write_text("{}\n")
    (tmp_path / "ft.yaml").write_text("{}\n")
    settings = {
        "run_dir": str(tmp_path / "run"),
        "prep": {
            "sources": [
                {"name": "tr", "source": "cc3m", "inputs": [str(tmp_path / "a.tsv")], "feeds": ["pretrain:data.train"]},
                {"name": "te", "source": "coco", "inputs": [str(tmp_path / "k.json")], "feeds": ["eval"]},
            ]
        },
        "pretrain": {"config": str(tmp_path / "pre.yaml")},
        "finetune": {"config": str(tmp_path / "ft.yaml")},
        "eval": {"checkpoints": ["finetune", "pretrain"]},
    }
    settings.update(extra)
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **scripts: str) -> None:
    """Put executables named after the keywords (bash bodies) first on the PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def record_submission(run: Path, jobs: list[tuple[str, str, int]]) -> None:
    (run / "slurm").mkdir(parents=True, exist_ok=True)
    record = {"jobs": [{"name": n, "job_id": j, "array_size": a} for n, j, a in jobs]}
    (run / "slurm" / SUBMISSION_FILE).write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"prep.sources.0.inputs": ["/data/a\tb.tsv"]}, "prep.sources.0.inputs.0"),
        ({"prep.sources.0.options": {"image_root": "/img\n--output=/etc"}}, "prep.sources.0.options.image_root"),
        ({"run_dir": "/runs/x\ny"}, "run_dir"),
        ({"eval.data": ["/d\tx"]}, "eval.data.0"),
        ({"pretrain.overrides": {"train.note": "a\rb"}}, "pretrain.overrides.train.note"),
    ],
)
def test_tab_or_newline_in_a_setting_is_refused(tmp_path: Path, overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        submit(stages="prep,pretrain,eval", config=str(settings_file(tmp_path)), dry_run=True, overrides=overrides)
    assert key in str(err.value)
    assert not (tmp_path / "run").exists()


def test_tab_in_the_current_folder_is_refused_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = settings_file(tmp_path, run_dir="run")  # relative: resolved against the current folder
    odd = tmp_path / "x\ty"
    odd.mkdir()
    monkeypatch.chdir(odd)
    assert submit_command("prep", str(config), dry_run=True) == 2
    assert "paths (resolved against the current folder)" in capsys.readouterr().err
    assert list(odd.iterdir()) == []


@pytest.mark.parametrize(
    ("resources", "ok"),
    [
        ({"ntasks_per_node": 8, "gpus_per_node": 8}, True),
        ({"ntasks_per_node": 4, "gpus_per_node": 8}, False),
        ({"ntasks_per_node": 8, "gpus_per_node": 0, "sbatch_args": ["--gres=gpu:a100:4"]}, False),
        ({"ntasks_per_node": 4, "gpus_per_node": 0, "sbatch_args": ["--gres=gpu:4"]}, True),
        ({"ntasks_per_node": 2, "gpus_per_node": 0}, True),  # CPU job
    ],
)
def test_tasks_per_node_must_equal_gpus_per_node(tmp_path: Path, resources: dict, ok: bool) -> None:
    overrides = {f"pretrain.resources.{k}": v for k, v in resources.items()}
    config = str(settings_file(tmp_path))
    if ok:
        submit(stages="pretrain", config=config, dry_run=True, overrides=overrides)
    else:
        with pytest.raises(ConfigError, match="pretrain.resources.ntasks_per_node.*one rank per GPU"):
            submit(stages="pretrain", config=config, dry_run=True, overrides=overrides)


def _eval_lines(out: str) -> list[str]:
    (printf,) = [line for line in out.splitlines() if line.startswith("printf") and "eval_tasks.tsv" in line]
    return [word.split(" > ")[0].rstrip() for word in printf.split("$'")[1:]]


def test_eval_takes_finetunings_best_only_when_it_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(settings_file(tmp_path))
    run = tmp_path / "run"
    submit(stages="eval", config=config, dry_run=True)
    captured = capsys.readouterr()
    finetune, pretrain = _eval_lines(captured.out)
    assert finetune.startswith(f"--checkpoint={run}/finetune\\t")  # no data.val: no `best`, so its latest
    assert "fine-tuning has no data.val" in captured.err
    assert pretrain.startswith(f"--checkpoint={run}/pretrain\\t")

    (tmp_path / "ft.yaml").write_text("data: {val: /data/coco_val}\n")
    submit(stages="eval", config=config, dry_run=True, overrides={"eval.checkpoints": ["finetune", "finetune:latest"]})
    best, latest = _eval_lines(capsys.readouterr().out)
    assert best.startswith(f"--checkpoint={run}/finetune/checkpoints/best\\t--data=")
    assert best.endswith(f"--output_dir={run}/finetune'")
    assert latest.startswith(f"--checkpoint={run}/finetune\\t")  # explicit: its own output folder
    assert latest.endswith(f"--output_dir={run}/eval/finetune_latest'")


def test_a_run_folder_with_live_jobs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(settings_file(tmp_path))
    record_submission(tmp_path / "run", [("pretrain", "7", 0)])
    fake_tools(
        tmp_path,
        monkeypatch,
        scontrol='echo "JobId=7 JobName=albef-pretrain JobState=RUNNING Reason=None Restarts=0 ExitCode=0:0"\n',
        sbatch="echo 99\n",
    )
    assert submit_command("pretrain", config) == 2
    err = capsys.readouterr().err
    assert "run_dir" in err and "pretrain 7 RUNNING" in err
    submit(stages="pretrain", config=config, dry_run=True)  # a dry run only warns
    assert "submitting would be refused" in capsys.readouterr().err


SCONTROL_FORGOT = """\
if [[ $1 == show && $2 == job ]]; then echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi
if [[ $1 == show && $2 == config ]]; then
    echo "JobCompLoc              = $JOBCOMP"; echo "JobCompType             = jobcomp/filetxt"; fi
"""


def test_status_asks_sacct_when_scontrol_forgot_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sacct = 'printf "%s\\n" "5_1|COMPLETED|0:0" "5_2|FAILED|1:0" "9|REQUEUED|0:0" "9|CANCELLED by 0|0:15"\n'
    fake_tools(tmp_path, monkeypatch, scontrol=SCONTROL_FORGOT, sacct=sacct)
    infos = query_job("5", "prep", array_size=2)
    assert [(i.job_id, i.state, i.exit_code, i.restarts) for i in infos] == [
        ("5_1", "COMPLETED", "0:0", 0),
        ("5_2", "FAILED", "1:0", 0),
        ("9", "CANCELLED", "0:15", 1),  # sacct --duplicates: one row per run
    ]
    assert all(i.final for i in infos)


def test_status_reads_the_completion_log_without_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "jobcomp.txt"
    log.write_text(
        "JobId=12 UserId=root(0) Name=albef-pretrain JobState=REQUEUED Partition=debug ExitCode=0:0\n"
        "JobId=13 Name=albef-prep JobState=FAILED ArrayJobId=11 ArrayTaskId=2 ExitCode=1:0\n"
        "JobId=11 Name=albef-prep JobState=COMPLETED ArrayJobId=11 ArrayTaskId=1 ExitCode=0:0\n"
        "JobId=12 UserId=root(0) Name=albef-pretrain JobState=COMPLETED Partition=debug ExitCode=0:0\n"
    )
    sacct = 'echo "Slurm accounting storage is disabled" >&2; exit 1\n'
    fake_tools(tmp_path, monkeypatch, scontrol=SCONTROL_FORGOT, sacct=sacct)
    monkeypatch.setenv("JOBCOMP", str(log))
    (pretrain,) = query_job("12", "pretrain")
    assert (pretrain.state, pretrain.restarts, pretrain.final, pretrain.ok) == ("COMPLETED", 1, True, True)
    prep = query_job("11", "prep", array_size=2)
    assert [(i.job_id, i.state) for i in prep] == [("11_1", "COMPLETED"), ("11_2", "FAILED")]
    # Known to nobody: final with an unknown outcome, never an endless wait.
    (gone,) = query_job("14", "eval")
    assert gone.state == "PURGED" and gone.final and not gone.ok
    assert "UNKNOWN OUTCOME: eval job 14" in format_status([gone])


def test_wait_is_bounded_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert wait.__defaults__ is not None and DEFAULT_WAIT_TIMEOUT_S in wait.__defaults__
    record_submission(tmp_path / "run", [("pretrain", "7", 0)])
    fake_tools(tmp_path, monkeypatch, scontrol='echo "JobId=7 JobState=RUNNING Restarts=0 ExitCode=0:0"\n')
    with pytest.raises(TimeoutError, match="still running after"):
        wait(tmp_path / "run", poll_s=0.05, timeout_s=0.2)
    assert status_command(str(tmp_path / "run"), wait_for_end=True, poll_s=0.05, timeout_s=0.2) == 1
    assert "still running" in capsys.readouterr().err
    # A controller that does not answer is not a final state: waiting goes on.
    fake_tools(tmp_path, monkeypatch, scontrol='echo "Unable to contact slurm controller" >&2; exit 1\n')
    (info,) = query_job("7", "pretrain")
    assert info.state == "UNKNOWN" and not info.final
