"""The submitter without a cluster: settings validation, the exact --dry_run lines, clear errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import SLURM_TEMPLATE_DIR, ConfigError
from pipeline.slurm.config import load_settings
from pipeline.slurm.submit import (
    JobInfo,
    SlurmSubmitError,
    format_status,
    parse_scontrol_line,
    status_command,
    submit,
    submit_command,
)


def write_settings(tmp_path: Path, **extra: object) -> Path:
    """A small settings file: two prep sources (one in two chunks), tiny stage configs."""
    (tmp_path / "pre.yaml").write_text("{}\n")
    (tmp_path / "ft.yaml").write_text("{}\n")
    settings = {
        "run_dir": str(tmp_path / "run"),
        "cluster": {
            "partition": "gpu",
            "account": "proj1",
            "sbatch_args": ["--constraint=a100"],
            "cpu_partition": "cpu",
            "cpu_sbatch_args": ["--mem-per-cpu=2G"],
        },
        "prep": {
            "resources": {"cpus_per_task": 4, "time": "02:00:00", "max_parallel": 2},
            "sources": [
                {
                    "name": "toy",
                    "source": "cc3m",
                    "inputs": [str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")],
                    "feeds": ["pretrain:data.train"],
                },
                {
                    "name": "toy_test",
                    "source": "flickr30k",
                    "inputs": [str(tmp_path / "k.json")],
                    "options": {"split": "test", "image_root": "img"},
                    "feeds": ["eval", "finetune:data.val"],
                },
            ],
        },
        "pretrain": {
            "resources": {
                "nodes": 2,
                "ntasks_per_node": 4,
                "gpus_per_node": 4,
                "cpus_per_task": 8,
                "mem": "200G",
                "time": "1-00:00:00",
            },
            "config": str(tmp_path / "pre.yaml"),
            "overrides": {"train.max_steps": 10},
            "preempt_grace_s": 90,
        },
        "finetune": {"config": str(tmp_path / "ft.yaml")},
        "eval": {"checkpoints": ["finetune", "pretrain"], "k_test": 16},
    }
    settings.update(extra)
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def test_dry_run_prints_the_exact_sbatch_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_settings(tmp_path)
    jobs = submit(stages="prep,pretrain,finetune,eval", config=str(config), dry_run=True)
    out = capsys.readouterr().out.splitlines()
    run, s, t = tmp_path / "run", SLURM_TEMPLATE_DIR, tmp_path
    site = "--partition=gpu --account=proj1 --constraint=a100"
    cpu_site = "--partition=cpu --account=proj1 --mem-per-cpu=2G"  # GPU options never reach CPU jobs
    export = "--export=ALL,ALBEF_CMD=albef"
    expected = [
        f"prep=$(sbatch --parsable --job-name=albef-prep --output={run}/logs/%x-%A_%a.out --array=1-3%2 {cpu_site} "
        f"--nodes=1 --ntasks-per-node=1 --cpus-per-task=4 --time=02:00:00 {export} {s}/prep.sbatch "
        f"{run}/slurm/prep_tasks.tsv)",
        f"prep_check=$(sbatch --parsable --job-name=albef-prep-check --output={run}/logs/%x-%j.out "
        f"--dependency=afterok:$prep {cpu_site} --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --time=00:10:00 "
        f"{export} {s}/prep_check.sbatch {run}/slurm/prep_tasks.tsv)",
        f"pretrain=$(sbatch --parsable --job-name=albef-pretrain --output={run}/logs/%x-%j.out "
        f"--dependency=afterok:$prep_check {site} --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8 "
        f"--mem=200G --time=1-00:00:00 --signal=B:USR1@90 {export} {s}/pretrain.sbatch {run}/pretrain {t}/pre.yaml "
        f'--train.max_steps=10 \'--data.train=["{run}/prep/toy/part-000", "{run}/prep/toy/part-001"]\')',
        f"finetune=$(sbatch --parsable --job-name=albef-finetune --output={run}/logs/%x-%j.out "
        f"--dependency=afterok:$pretrain {site} --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --time=01:00:00 "
        f"--signal=B:USR1@300 {export} {s}/finetune.sbatch retrieval {run}/finetune {t}/ft.yaml {run}/pretrain "
        f"--data.val={run}/prep/toy_test)",
        f"eval=$(sbatch --parsable --job-name=albef-eval --output={run}/logs/%x-%A_%a.out "
        f"--dependency=afterok:$finetune --array=1-2 {site} --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 "
        f"--time=01:00:00 {export} {s}/eval.sbatch retrieval {run}/slurm/eval_tasks.tsv)",
    ]
    assert [line for line in out if not line.startswith(("#", "warning:", "mkdir ", "printf "))] == expected
    assert [j.job_id for j in jobs] == [None] * 5
    assert not run.exists()  # a dry run writes nothing; its snippet writes the task lists
    _run_snippet("\n".join(out), tmp_path)
    # The array task lists the lines point at: one `albef prep` / `albef evaluate` argv per line.
    assert (run / "slurm" / "prep_tasks.tsv").read_text().splitlines() == [
        f"cc3m\t--input={t}/a.tsv\t--output={run}/prep/toy/part-000\t--processes=4",
        f"cc3m\t--input={t}/b.tsv\t--output={run}/prep/toy/part-001\t--processes=4",
        f"flickr30k\t--input={t}/k.json\t--output={run}/prep/toy_test\t--processes=4\t--split=test\t--image_root={Path.cwd() / 'img'}",
    ]
    assert (run / "slurm" / "eval_tasks.tsv").read_text().splitlines() == [  # fine-tuning validates: its `best`
        f"--checkpoint={run}/finetune/checkpoints/best\t--data={run}/prep/toy_test\t--output_dir={run}/finetune\t--k_test=16",
        f"--checkpoint={run}/pretrain\t--data={run}/prep/toy_test\t--output_dir={run}/pretrain\t--k_test=16",
    ]
    assert not (run / "slurm" / "submission.json").exists()


def _run_snippet(snippet: str, tmp_path: Path) -> None:
    """Run a --dry_run snippet with a fake sbatch (prints an id): it must be valid bash."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text("#!/bin/bash\necho 42\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_of_a_partial_chain_has_no_dangling_dependency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_settings(tmp_path)
    submit(
        stages=("finetune", "pretrain"),
        config=str(config),
        dry_run=True,
        overrides={"pretrain.resources.nodes": 1, "finetune.checkpoint": "/ckpt/official.pth"},
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(("#", "warning:", "mkdir"))]
    assert [line.split("=", 1)[0] for line in lines] == ["pretrain", "finetune"]  # pipeline order
    assert "--dependency" not in lines[0] and "--nodes=1 " in lines[0]
    assert "--dependency=afterok:$pretrain " in lines[1] and " /ckpt/official.pth " in lines[1]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"pretrain.resources.nodez": 2}, "pretrain.resources.nodez"),
        ({"pretrain.resources.nodes": 0}, "pretrain.resources.nodes"),
        ({"pretrain.resources.nodes": "two"}, "pretrain.resources.nodes"),
        ({"prep.resources.time": "3 hours"}, "prep.resources.time"),
        ({"prep.sources.0.feeds": ["pretrain"]}, "prep.sources.0.feeds"),
        ({"prep.sources.1.name": "toy"}, "prep.sources.1.name"),
        ({"prep.sources.0.options": {"output": "/x"}}, "prep.sources.0.options.output"),
        ({"prep.sources.5.name": "x"}, "prep.sources.5.name"),
        ({"finetune.config": "no_such_config.yaml"}, "finetune.config"),
        ({"pretrain.overrides": {"data.train": ["/x"]}}, "pretrain.overrides.data.train"),
        ({"eval.checkpoints": []}, "eval.checkpoints"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, overrides: dict, key: str) -> None:
    config = write_settings(tmp_path)
    with pytest.raises(ConfigError) as err:
        submit(stages="prep,pretrain,finetune,eval", config=str(config), dry_run=True, overrides=overrides)
    assert key in str(err.value)


def test_unknown_stage_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stages"):
        submit(stages="prep,train", config=str(write_settings(tmp_path)), dry_run=True)


def test_missing_sbatch_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SlurmSubmitError, match="sbatch not found on PATH.*--dry_run"):
        submit(stages="prep", config=str(write_settings(tmp_path)))


def test_bundled_settings_load() -> None:
    demo = load_settings("slurm_demo.yaml")
    cluster = load_settings("slurm_cluster.yaml")
    assert demo.pretrain.resources.ntasks_per_node == 2 and demo.pretrain.resources.gpus_per_node == 0
    assert cluster.pretrain.resources.gpus_per_node == cluster.pretrain.resources.ntasks_per_node == 8


def test_status_report_names_failed_and_never_run_jobs() -> None:
    line = (
        "JobId=7 ArrayJobId=5 ArrayTaskId=2 JobName=albef-prep UserId=root(0) JobState=FAILED "
        "Reason=NonZeroExitCode Dependency=(null) Restarts=0 ExitCode=1:0 StdOut=/r/logs/albef-prep-5_2.out"
    )
    fields = parse_scontrol_line(line)
    assert (fields["JobState"], fields["ExitCode"], fields["ArrayTaskId"]) == ("FAILED", "1:0", "2")
    infos = [
        JobInfo("prep", "5_2", "FAILED", "NonZeroExitCode", "1:0", 0, "/r/logs/albef-prep-5_2.out"),
        JobInfo("pretrain", "9", "CANCELLED", "DependencyNeverSatisfied", "0:0"),
    ]
    report = format_status(infos)
    assert "FAILED: prep job 5_2" in report and "/r/logs/albef-prep-5_2.out" in report
    assert "NEVER RAN (DependencyNeverSatisfied, an upstream job failed): pretrain (9)" in report
    assert all(i.final for i in infos) and not any(i.ok for i in infos)


def test_submit_command_turns_errors_into_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = str(write_settings(tmp_path))
    assert submit_command("prep", config, dry_run=True, overrides={"prep.resources.cpus_per_task": -1}) == 2
    assert "bad settings: config key 'prep.resources.cpus_per_task'" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert submit_command("prep", config) == 1
    assert "sbatch not found" in capsys.readouterr().err
    assert status_command(str(tmp_path / "nothing_here")) == 2
