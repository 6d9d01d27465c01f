"""Every downstream task and NLVR2's text-assignment stage through `albef slurm submit`, without a
cluster: the planned sbatch argv and task lists, the ta -> finetune checkpoint default, task-name
errors (exit 2, key named), and the albef command lines the sbatch scripts run from those argv
(fake srun/scontrol on the PATH)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli import Evaluate, Finetune
from pipeline.config import REPO_ROOT, ConfigError
from pipeline.slurm.config import TASKS, load_settings
from pipeline.slurm.submit import Plan, PlannedJob, build_plan, submit_command

# The `albef prep` source each task's data comes from (names of the preps, existing or being added).
PREP_SOURCE = {"retrieval": "coco", "ve": "snli_ve", "vqa": "vqa", "nlvr": "nlvr2", "grounding": "refcoco+"}


def write_settings(tmp_path: Path, task: str, **extra: object) -> Path:
    """A chain for `task`: one prep source feeding fine-tuning's train data, one its val data + eval."""
    for name in ("pre.yaml", "ta.yaml", "ft.yaml", "train.json", "val.json"):
        (tmp_path / name).write_text("{}\n")
    source = PREP_SOURCE[task]
    settings: dict = {
        "run_dir": str(tmp_path / "run"),
        "prep": {
            "sources": [
                {
                    "name": f"{task}_train",
                    "source": source,
                    "inputs": [str(tmp_path / "train.json")],
                    "options": {"split": "train"},
                    "feeds": ["finetune:data.train"],
                },
                {
                    "name": f"{task}_val",
                    "source": source,
                    "inputs": [str(tmp_path / "val.json")],
                    "options": {"split": "val"},
                    "feeds": ["finetune:data.val", "eval"],
                },
            ]
        },  # fmt: skip
        "pretrain": {"config": str(tmp_path / "pre.yaml")},
        "ta": {"config": str(tmp_path / "ta.yaml"), "preempt_grace_s": 120},
        "finetune": {"task": task, "config": str(tmp_path / "ft.yaml"), "overrides": {"train.epochs": 2}},
        "eval": {"checkpoints": ["finetune"], "k_test": 16 if task == "retrieval" else None},
    }
    for key, value in extra.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def plan_for(path: Path, stages: list[str], overrides: dict | None = None) -> Plan:
    return build_plan(load_settings(path, overrides), stages)


def script_args(job: PlannedJob) -> tuple[str, list[str]]:
    """(script name, its arguments) of a planned sbatch argv."""
    (i,) = [k for k, word in enumerate(job.argv) if word.endswith(".sbatch")]
    return Path(job.argv[i]).name, job.argv[i + 1 :]


@pytest.mark.parametrize("task", TASKS)
def test_each_task_chains_prep_finetune_eval(tmp_path: Path, task: str) -> None:
    plan = plan_for(write_settings(tmp_path, task), ["prep", "finetune", "eval"])
    run = tmp_path / "run"
    assert [(j.name, j.after) for j in plan.jobs] == [
        ("prep", None), ("prep_check", "prep"), ("finetune", "prep_check"), ("eval", "finetune"),
    ]  # fmt: skip
    prep, _, finetune, evaluate = plan.jobs
    # Prep: one `albef prep SOURCE` line per input, whatever the source is called.
    assert plan.task_files[run / "slurm" / "prep_tasks.tsv"].splitlines() == [
        f"{PREP_SOURCE[task]}\t--input={tmp_path}/{split}.json\t--output={run}/prep/{task}_{split}"
        f"\t--processes=4\t--split={split}"
        for split in ("train", "val")
    ]
    # Fine-tuning: the task is the script's first argument; the prep folders are fed to its data keys.
    assert script_args(finetune) == (
        "finetune.sbatch",
        [task, f"{run}/finetune", f"{tmp_path}/ft.yaml", f"{run}/pretrain", "--train.epochs=2",
         f"--data.train={run}/prep/{task}_train", f"--data.val={run}/prep/{task}_val"],
    )  # fmt: skip
    assert "--signal=B:USR1@300" in finetune.argv
    # Eval: `albef evaluate TASK`, fine-tuning's `best` (it validates), k_test for retrieval only.
    assert script_args(evaluate) == ("eval.sbatch", [task, f"{run}/slurm/eval_tasks.tsv"])
    assert evaluate.array_size == 1
    line = f"--checkpoint={run}/finetune/checkpoints/best\t--data={run}/prep/{task}_val\t--output_dir={run}/finetune"
    expected = line + ("\t--k_test=16" if task == "retrieval" else "")
    assert plan.task_files[run / "slurm" / "eval_tasks.tsv"] == expected + "\n"


@pytest.mark.parametrize("task", TASKS)
def test_eval_of_a_task_without_validation_takes_its_latest(tmp_path: Path, task: str) -> None:
    """The one checkpoint rule for every task: `best` only when fine-tuning has data.val."""
    path = write_settings(tmp_path, task)
    settings = yaml.safe_load(path.read_text())
    settings["prep"]["sources"][1]["feeds"] = ["eval"]
    path.write_text(yaml.safe_dump(settings))
    plan = plan_for(path, ["eval"], {"eval.task": task, "eval.data": [str(tmp_path / "extra")]})
    rows = plan.task_files[tmp_path / "run" / "slurm" / "eval_tasks.tsv"].splitlines()
    assert [r.split("\t")[:2] for r in rows] == [
        [f"--checkpoint={tmp_path}/run/finetune", f"--data={tmp_path}/run/prep/{task}_val"],
        [f"--checkpoint={tmp_path}/run/finetune", f"--data={tmp_path}/extra"],
    ]
    assert any("no data.val" in w for w in plan.warnings)
    assert [j.after for j in plan.jobs] == [None]  # alone: no dependency


def test_ta_runs_between_pretrain_and_finetune(tmp_path: Path) -> None:
    path = write_settings(
        tmp_path,
        "nlvr",
        ta={"overrides": {"train.max_steps": 5}},
        eval={"checkpoints": ["finetune", "/ckpt/nlvr_official.pth"]},
    )
    settings = yaml.safe_load(path.read_text())
    settings["prep"]["sources"][0]["feeds"] += ["ta:data.train"]  # TA pretrains on the train images
    path.write_text(yaml.safe_dump(settings))
    plan = plan_for(path, ["prep", "pretrain", "ta", "finetune", "eval"])
    run = tmp_path / "run"
    assert [(j.name, j.after) for j in plan.jobs] == [
        ("prep", None), ("prep_check", "prep"), ("pretrain", "prep_check"), ("ta", "pretrain"),
        ("finetune", "ta"), ("eval", "finetune"),
    ]  # fmt: skip
    ta, finetune = plan.jobs[3], plan.jobs[4]
    # ta = more pretraining: pretrain.sbatch into RUN/ta, --checkpoint passed through to `albef pretrain`.
    assert script_args(ta) == (
        "pretrain.sbatch",
        [f"{run}/ta", f"{tmp_path}/ta.yaml", f"--checkpoint={run}/pretrain", "--train.max_steps=5",
         f"--data.train={run}/prep/nlvr_train"],
    )  # fmt: skip
    assert "--job-name=albef-ta" in ta.argv and "--signal=B:USR1@120" in ta.argv
    assert script_args(finetune)[1][:4] == ["nlvr", f"{run}/finetune", f"{tmp_path}/ft.yaml", f"{run}/ta"]
    rows = plan.task_files[run / "slurm" / "eval_tasks.tsv"].splitlines()
    assert [r.split("\t")[0] for r in rows] == [
        f"--checkpoint={run}/finetune/checkpoints/best",
        "--checkpoint=/ckpt/nlvr_official.pth",
    ]
    assert rows[1].endswith(f"--output_dir={run}/eval/nlvr_official")
    assert not plan.warnings


def test_ta_checkpoints_without_ta_in_the_chain(tmp_path: Path) -> None:
    path = write_settings(tmp_path, "nlvr")
    run = tmp_path / "run"
    # Without ta, NLVR2 fine-tuning starts from pretraining, with a warning naming the way to ta.
    plan = plan_for(path, ["pretrain", "finetune"])
    assert script_args(plan.jobs[1])[1][3] == f"{run}/pretrain"
    assert any("without text-assignment pretraining" in w and f"{run}/ta" in w for w in plan.warnings)
    # An earlier ta run, explicitly; and ta alone from an official pretrained model.
    plan = plan_for(path, ["finetune"], {"finetune.checkpoint": str(run / "ta")})
    assert script_args(plan.jobs[0])[1][3] == f"{run}/ta" and not plan.warnings
    plan = plan_for(path, ["ta"], {"ta.checkpoint": "/ckpt/ALBEF_4M.pth"})
    (ta,) = plan.jobs
    assert ta.after is None and script_args(ta)[1][2] == "--checkpoint=/ckpt/ALBEF_4M.pth"
    # Other tasks start from pretraining without a word.
    plan = plan_for(path, ["finetune"], {"finetune.task": "vqa"})
    args = script_args(plan.jobs[0])[1]
    assert (args[0], args[3]) == ("vqa", f"{run}/pretrain") and not plan.warnings


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"finetune.task": "nlvr2"}, "finetune.task"),
        ({"eval.task": "Retrieval"}, "eval.task"),
        ({"eval.k_test": 16, "finetune.task": "vqa"}, "eval.k_test"),
        ({"eval.task": "retrieval"}, "eval.task"),  # fine-tuning's ve model evaluated as retrieval
        ({"eval.checkpoints": ["finetune", "pretrain"]}, "eval.checkpoints"),  # zero-shot: retrieval only
        ({"ta.overrides": {"checkpoint": "/x.pth"}}, "ta.overrides.checkpoint"),
        ({"prep.sources.0.feeds": ["tb:data.train"]}, "prep.sources.0.feeds"),
        ({"ta.resources.ntasks_per_node": 2, "ta.resources.gpus_per_node": 4}, "ta.resources.ntasks_per_node"),
        ({"ta.preempt_grace_s": 0}, "ta.preempt_grace_s"),
        ({"ta.config": "no_such_ta.yaml"}, "ta.config"),
    ],
)
def test_bad_task_settings_name_the_key_and_exit_2(
    tmp_path: Path, overrides: dict, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_settings(tmp_path, "ve")
    with pytest.raises(ConfigError) as err:
        plan_for(path, ["prep", "ta", "finetune", "eval"], overrides)
    assert key in str(err.value)
    assert submit_command("prep,ta,finetune,eval", str(path), dry_run=True, overrides=overrides) == 2
    assert f"bad settings: config key '{key}'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_task_defaults_to_finetunes_and_may_differ_for_paths(tmp_path: Path) -> None:
    path = write_settings(tmp_path, "ve")
    assert script_args(plan_for(path, ["eval"]).jobs[0])[1][0] == "ve"
    plan = plan_for(path, ["eval"], {"eval.task": "grounding", "eval.checkpoints": ["/ckpt/grounding.pth"]})
    assert script_args(plan.jobs[0])[1][0] == "grounding"


def test_new_prep_sources_path_options_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Task lines never depend on the job's working folder, for flags the submitter does not know."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "answer_list.json").write_text("[]")
    (tmp_path / "test").mkdir()  # a bare word that happens to name a folder stays a word
    options = {"split": "test", "answer_list": "answer_list.json", "image_root": "images", "top_k": 3}
    path = write_settings(tmp_path, "vqa")
    plan = plan_for(path, ["prep"], {"prep.sources.0.options": options})
    first = plan.task_files[tmp_path / "run" / "slurm" / "prep_tasks.tsv"].splitlines()[0].split("\t")
    assert first[3:] == [
        "--processes=4",
        "--split=test",
        f"--answer_list={tmp_path}/answer_list.json",
        f"--image_root={tmp_path}/images",
        "--top_k=3",
    ]


def test_every_cli_task_is_a_known_task() -> None:
    """TASKS is the one list: a task added to `albef finetune` / `albef evaluate` must be in it."""
    for group in (Finetune, Evaluate):
        names = {n for n, _ in inspect.getmembers(group, inspect.isfunction) if not n.startswith("_")}
        assert {"retrieval", "ve"} <= names <= set(TASKS), (group.__name__, names)


def _fake_bin(tmp_path: Path) -> dict[str, str]:
    """srun that records its argv (one per line) and scontrol that names the node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SRUN_ARGS": str(tmp_path / "srun_args.txt"),
        "SLURM_JOB_ID": "41",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NTASKS": "1",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_JOB_ID": "40",
    }


def test_sbatch_scripts_run_the_planned_task_and_pass_ta_args_on(tmp_path: Path) -> None:
    """The scripts, given the planned arguments, start `albef pretrain ... --checkpoint=CK`,
    `albef finetune TASK ...` and `albef evaluate TASK <task line>`."""
    path = write_settings(tmp_path, "nlvr", albef_command="albef")
    plan = plan_for(path, ["ta", "finetune", "eval"])
    plan.run_dir.mkdir()
    for file, text in plan.task_files.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    env = _fake_bin(tmp_path)
    run = tmp_path / "run"
    started = {}
    for job in plan.jobs:
        (i,) = [k for k, word in enumerate(job.argv) if word.endswith(".sbatch")]
        proc = subprocess.run(["bash", *job.argv[i:]], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        started[job.name] = Path(env["SRUN_ARGS"]).read_text().splitlines()
        assert started[job.name][:3] == ["--cpus-per-task=1", "--kill-on-bad-exit=1", "albef"]
    assert started["ta"][3:] == [
        "pretrain", "--config", f"{tmp_path}/ta.yaml", "--output_dir", f"{run}/ta", "--resume", "auto",
        f"--checkpoint={run}/pretrain",
    ]  # fmt: skip
    assert started["finetune"][3:10] == [
        "finetune", "nlvr", "--config", f"{tmp_path}/ft.yaml", "--checkpoint", f"{run}/ta", "--output_dir",
    ]  # fmt: skip
    assert started["eval"][3:] == [
        "evaluate", "nlvr", f"--checkpoint={run}/finetune/checkpoints/best", f"--data={run}/prep/nlvr_val", f"--output_dir={run}/finetune",
    ]  # fmt: skip


def test_readme_ve_chain_example_plans(tmp_path: Path) -> None:
    """The SNLI-VE settings of the README's SLURM section are valid and chain what they say."""
    readme = (REPO_ROOT / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(# ve_chain\.yaml.*?)```", readme, re.S)
    (tmp_path / "ve_chain.yaml").write_text(block)
    plan = plan_for(tmp_path / "ve_chain.yaml", ["prep", "finetune", "eval"])
    run = Path("/scratch/albef/runs/ve")
    assert [j.name for j in plan.jobs] == ["prep", "prep_check", "finetune", "eval"]
    assert script_args(plan.jobs[2])[1][:4] == [
        "ve", f"{run}/finetune", str(REPO_ROOT / "pipeline" / "configs" / "ve_snli.yaml"),
        "/scratch/albef/runs/4m/pretrain",
    ]  # fmt: skip
    assert script_args(plan.jobs[3])[1][0] == "ve"
    assert plan.task_files[run / "slurm" / "eval_tasks.tsv"] == (
        f"--checkpoint={run}/finetune/checkpoints/best\t--data={run}/prep/snli_ve_test\t--output_dir={run}/finetune\n"
    )
