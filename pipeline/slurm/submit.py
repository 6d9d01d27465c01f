"""`albef slurm submit`: fill the slurm/*.sbatch scripts from the settings and submit them chained.

The chain is linear: prep array -> prep check -> pretrain -> ta -> finetune -> eval array (any
subset, in that order), each job with `--dependency=afterok:<previous>` (an array id waits for every
task of the array). `ta` is NLVR2's text-assignment pretraining (pretrain.sbatch with
`--checkpoint`); finetune and eval run `albef finetune TASK` / `albef evaluate TASK` for the
settings' task. A job script gets its values only from its sbatch command line and `--export`, so
the printed lines (`--dry_run`) are the whole story: a user can copy them, edit them, or run the
scripts by hand.

When a submission fails half-way, the jobs already submitted are cancelled (scancel) and the error
says so; if cancelling fails too, the ids to cancel are printed. A run folder whose last submission
still has queued or running jobs is refused (two chains would write the same checkpoints).
`--dry_run` writes nothing: it prints the commands that would write the task lists and submit.

`status`/`wait` read the jobs back with `scontrol show job -o`; a job that ended more than
MinJobAge (300 s by default) ago is forgotten by scontrol, and is then read from `sacct` (the
accounting database) or, without one, from the job completion log (JobCompType=jobcomp/filetxt).
Both name the failed job and the dependents that will never run. `wait` gives up after
DEFAULT_WAIT_TIMEOUT_S unless told otherwise.
Console output is this command's product, hence `print` (to stdout), not logging.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.config import SLURM_TEMPLATE_DIR, ConfigError, read_yaml
from pipeline.slurm.config import (
    STAGES,
    Resources,
    SlurmSettings,
    check_no_control_chars,
    eval_task,
    load_settings,
    resolve_config_path,
)

DEFAULT_CONFIG = "slurm_demo.yaml"
DEFAULT_STAGES = ("prep", "pretrain", "finetune", "eval")  # as `albef slurm submit`; ta is NLVR2's extra step
SUBMISSION_FILE = "submission.json"  # RUN/slurm/submission.json: what was submitted, for status()
# Final job states; PENDING with reason DependencyNeverSatisfied is final too (without
# kill_invalid_depend SLURM keeps such jobs pending forever).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "PURGED",  # forgotten by scontrol, and neither sacct nor a completion log knows it: outcome unknown
}
DEFAULT_WAIT_TIMEOUT_S = 7 * 24 * 3600.0  # `wait` gives up after this (a whole 4M chain fits)
CPU_STAGES = ("prep", "prep_check")  # get cluster.cpu_partition / cpu_sbatch_args
NEVER_SATISFIED = "DependencyNeverSatisfied"
PREP_PATH_OPTIONS = ("image_root", "regions", "exclude", "captions_file")  # `albef prep` flags naming files
# The job script of each planned job (ta is more pretraining: pretrain.sbatch, extra args passed on).
SCRIPTS = {
    "prep": "prep.sbatch",
    "prep_check": "prep_check.sbatch",
    "pretrain": "pretrain.sbatch",
    "ta": "pretrain.sbatch",
    "finetune": "finetune.sbatch",
    "eval": "eval.sbatch",
}


class SlurmSubmitError(RuntimeError):
    """sbatch is missing or refused a job; the message says what was cancelled."""


@dataclass
class PlannedJob:
    """One sbatch call. `after` names the earlier job this one waits for (afterok)."""

    name: str  # prep, prep_check, pretrain, ta, finetune, eval (also the shell variable in --dry_run)
    argv: list[str]  # sbatch ... script args, without the dependency
    after: str | None = None
    array_size: int = 0  # > 0 for job arrays
    job_id: str | None = None  # set once submitted

    def command(self, dependency_id: str | None) -> list[str]:
        """The sbatch argv with `--dependency` inserted after `--output`."""
        argv = list(self.argv)
        if dependency_id is not None:
            argv.insert(4, f"--dependency=afterok:{dependency_id}")
        return argv

    def shell_line(self) -> str:
        """`name=$(sbatch ...)` with the dependency as a shell variable: the exact, runnable line."""
        words = [shlex.quote(w) for w in self.argv]
        if self.after is not None:
            words.insert(4, f"--dependency=afterok:${self.after}")
        return f"{self.name}=$({' '.join(words)})"


@dataclass
class Plan:
    run_dir: Path
    jobs: list[PlannedJob]
    task_files: dict[Path, str] = field(default_factory=dict)  # path -> content (one line per array task)
    warnings: list[str] = field(default_factory=list)


@dataclass
class JobInfo:
    """One job (or array task) as `scontrol show job -o` reports it."""

    stage: str
    job_id: str  # "12" or "12_3" for an array task
    state: str
    reason: str = ""
    exit_code: str = ""
    restarts: int = 0
    log: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES or self.reason == NEVER_SATISFIED

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def submit(
    stages: list[str] | tuple[str, ...] | str = DEFAULT_STAGES,
    config: str | None = None,
    dry_run: bool = False,
    overrides: dict[str, Any] | None = None,
) -> list[PlannedJob]:
    """Plan the chain from the settings, write the task lists, then print (dry run) or submit it.

    Returns the planned jobs, with `job_id` set when submitted. Raises ConfigError for bad
    settings and SlurmSubmitError when sbatch is missing or refuses a job (after cancelling the jobs
    this call submitted).
    """
    settings = load_settings(config or DEFAULT_CONFIG, overrides)
    plan = build_plan(settings, _stage_list(stages))
    live = live_jobs(plan.run_dir)
    if live and not dry_run:
        raise ConfigError(
            "run_dir",
            f"{plan.run_dir} has jobs of its last submission still queued or running ({', '.join(live)}); "
            "a second chain would write the same checkpoints. Wait for them, scancel them, or use another run_dir",
        )
    if live:
        plan.warnings.append(f"{plan.run_dir} has live jobs ({', '.join(live)}): submitting would be refused")
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if dry_run:
        print(dry_run_script(plan))
        return plan.jobs
    write_task_files(plan)
    submit_plan(plan)
    _print_submitted(plan)
    return plan.jobs


def submit_command(
    stages: list[str] | tuple[str, ...] | str = DEFAULT_STAGES,
    config: str | None = None,
    dry_run: bool = False,
    overrides: dict[str, Any] | None = None,
) -> int:
    """`albef slurm submit` as an exit code: 0 submitted/printed, 2 bad settings, 1 sbatch failed.

    The errors are one readable message on stderr (not a traceback): they name the key or the job.
    """
    try:
        submit(stages=stages, config=config, dry_run=dry_run, overrides=overrides)
    except ConfigError as err:
        print(f"albef slurm submit: bad settings: {err}", file=sys.stderr)
        return 2
    except SlurmSubmitError as err:
        print(f"albef slurm submit: {err}", file=sys.stderr)
        return 1
    return 0


def status_command(
    run_dir: str, wait_for_end: bool = False, poll_s: float = 5.0, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S
) -> int:
    """`albef slurm status`: the table for the run's last submission (optionally after all jobs end).

    Exit code 1 when a job failed or will never run, or waiting timed out; else 0 (finished or
    still going).
    """
    record = Path(run_dir) / "slurm" / SUBMISSION_FILE
    if not record.is_file():
        print(f"albef slurm status: no submission recorded in {record}", file=sys.stderr)
        return 2
    try:
        infos = wait(run_dir, poll_s=poll_s, timeout_s=timeout_s) if wait_for_end else status(run_dir)
    except TimeoutError as err:
        print(f"albef slurm status: {err}", file=sys.stderr)
        return 1
    print(format_status(infos))
    return 1 if any(i.final and not i.ok for i in infos) else 0


def _stage_list(stages: list[str] | tuple[str, ...] | str) -> list[str]:
    names = stages.split(",") if isinstance(stages, str) else list(stages)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise ConfigError("stages", f"{unknown or names} not in {', '.join(STAGES)}")
    if len(set(names)) != len(names):
        raise ConfigError("stages", f"{names} repeats a stage")
    return [s for s in STAGES if s in names]  # always run in pipeline order


# ----------------------------------------------------------------------------- planning


def build_plan(settings: SlurmSettings, stages: list[str]) -> Plan:
    """Every sbatch line and task list of the chain, from the settings alone (no side effects)."""
    run_dir = Path(settings.run_dir).expanduser().resolve()
    scripts = Path(settings.scripts_dir).expanduser().resolve() if settings.scripts_dir else SLURM_TEMPLATE_DIR
    for stage in [*stages, "prep_check"] if "prep" in stages else stages:
        script = scripts / SCRIPTS[stage]
        if not script.is_file():
            raise ConfigError("scripts_dir", f"{script} not found")
    plan = Plan(run_dir=run_dir, jobs=[])
    prep_lines, feeds = _prep_tasks(settings, run_dir, plan.warnings)

    def add(name: str, res: Resources, args: list[str], array_size: int = 0, signal: int | None = None) -> None:
        log = "%x-%A_%a.out" if array_size else "%x-%j.out"
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name=albef-{name.replace('_', '-')}",
            f"--output={run_dir / 'logs' / log}",
        ]
        if array_size:
            limit = f"%{res.max_parallel}" if res.max_parallel else ""
            argv.append(f"--array=1-{array_size}{limit}")
        argv += _common_args(settings, cpu=name in CPU_STAGES) + _resource_args(res)
        if signal is not None:
            argv.append(f"--signal=B:USR1@{signal}")
        argv += res.sbatch_args + [_export(settings), str(scripts / SCRIPTS[name])] + args
        after = plan.jobs[-1].name if plan.jobs else None
        plan.jobs.append(PlannedJob(name=name, argv=argv, after=after, array_size=array_size))

    if "prep" in stages:
        if not prep_lines:
            raise ConfigError("prep.sources", "empty, nothing to prepare (or leave 'prep' out of --stages)")
        tasks = run_dir / "slurm" / "prep_tasks.tsv"
        plan.task_files[tasks] = "".join("\t".join(line) + "\n" for line in prep_lines)
        add("prep", settings.prep.resources, [str(tasks)], array_size=len(prep_lines))
        add("prep_check", Resources(time="00:10:00"), [str(tasks)])
    if "pretrain" in stages:
        st = settings.pretrain
        args = [str(run_dir / "pretrain"), str(resolve_config_path(st.config, "pretrain.config"))]
        args += _override_args({**st.overrides}, feeds.get("pretrain", {}), "pretrain.overrides")
        add("pretrain", st.resources, args, signal=st.preempt_grace_s)
    if "ta" in stages:  # more pretraining from a checkpoint: pretrain.sbatch passes --checkpoint on
        ta = settings.ta
        checkpoint = _abs(ta.checkpoint) if ta.checkpoint else str(run_dir / "pretrain")
        args = [str(run_dir / "ta"), str(resolve_config_path(ta.config, "ta.config")), f"--checkpoint={checkpoint}"]
        args += _override_args({**ta.overrides}, feeds.get("ta", {}), "ta.overrides")
        add("ta", ta.resources, args, signal=ta.preempt_grace_s)
    if "finetune" in stages:
        ft = settings.finetune
        args = [ft.task, str(run_dir / "finetune"), str(resolve_config_path(ft.config, "finetune.config"))]
        args.append(_finetune_checkpoint(settings, run_dir, "ta" in stages, plan.warnings))
        args += _override_args({**ft.overrides}, feeds.get("finetune", {}), "finetune.overrides")
        add("finetune", ft.resources, args, signal=ft.preempt_grace_s)
    if "eval" in stages:
        validates = _finetune_validates(settings, feeds.get("finetune", {}))
        lines = _eval_tasks(settings, run_dir, feeds.get("eval", {}).get("", []), validates, plan.warnings)
        tasks = run_dir / "slurm" / "eval_tasks.tsv"
        plan.task_files[tasks] = "".join("\t".join(line) + "\n" for line in lines)
        add("eval", settings.eval.resources, [eval_task(settings), str(tasks)], array_size=len(lines))
    # The settings were checked; what is left are paths resolved against the current folder.
    words = [w for job in plan.jobs for w in job.argv] + [str(p) for p in plan.task_files]
    words += [f for text in plan.task_files.values() for line in text.splitlines() for f in line.split("\t")]
    check_no_control_chars(words, "paths (resolved against the current folder)")
    return plan


def _prep_tasks(
    settings: SlurmSettings, run_dir: Path, warnings: list[str]
) -> tuple[list[list[str]], dict[str, dict[str, list[str]]]]:
    """One `albef prep` argument list per input chunk, and where each output folder is fed to."""
    lines: list[list[str]] = []
    feeds: dict[str, dict[str, list[str]]] = {}
    cpus = settings.prep.resources.cpus_per_task
    for src in settings.prep.sources:
        outputs = []
        for i, path in enumerate(src.inputs):
            out = run_dir / "prep" / src.name
            if len(src.inputs) > 1:
                out = out / f"part-{i:03d}"
            outputs.append(str(out))
            if not Path(_abs(path)).exists():
                warnings.append(f"prep input {path} ({src.name}) does not exist on this machine")
            options = {"processes": cpus, **src.options}  # img2dataset processes = the cores SLURM gives
            for key, value in options.items():  # task lines must not depend on the job's working folder
                if _is_local_path(key, value):
                    options[key] = _abs(value)
            lines.append(
                [src.source, f"--input={_abs(path)}", f"--output={out}"]
                + [f"--{k}={_value(v)}" for k, v in options.items()]
            )
        for feed in src.feeds:
            stage, _, key = feed.partition(":")
            feeds.setdefault(stage, {}).setdefault(key, []).extend(outputs)
    return lines, feeds


def _is_local_path(option: str, value: Any) -> bool:
    """Whether a prep option's value names a local file or folder: the known path flags, and any
    other flag whose value is a path that exists here (so the flags of new sources, e.g. an answer
    list or a proposals file, are resolved without being listed). Bare words (`test`) never are."""
    if not isinstance(value, str) or "://" in value:
        return False
    if option in PREP_PATH_OPTIONS:
        return True
    return ("/" in value or Path(value).suffix != "") and Path(value).expanduser().exists()


def _finetune_checkpoint(settings: SlurmSettings, run_dir: Path, with_ta: bool, warnings: list[str]) -> str:
    """finetune.checkpoint, else the ta folder when ta runs in this chain, else the pretrain folder."""
    ft = settings.finetune
    if ft.checkpoint:
        return _abs(ft.checkpoint)
    if with_ta:
        return str(run_dir / "ta")
    if ft.task == "nlvr":
        warnings.append(
            "finetune nlvr starts from the pretrain folder without text-assignment pretraining: add 'ta' to "
            f"--stages, or set finetune.checkpoint={run_dir / 'ta'} to use an earlier ta run"
        )
    return str(run_dir / "pretrain")


def _finetune_validates(settings: SlurmSettings, fed: dict[str, list[str]]) -> bool:
    """Whether fine-tuning has a `data.val` (so a `best` tag): fed by prep, overridden, or in its YAML."""
    ft = settings.finetune
    if "data.val" in fed or ft.overrides.get("data.val") is not None:
        return True
    path = resolve_config_path(ft.config, "finetune.config")
    data = read_yaml(path, "finetune.config").get("data") or {}
    return isinstance(data, dict) and data.get("val") is not None


def _eval_tasks(
    settings: SlurmSettings, run_dir: Path, fed: list[str], finetune_validates: bool, warnings: list[str]
) -> list[list[str]]:
    """One `albef evaluate TASK` argument list per (checkpoint, eval data) pair (k_test: retrieval only).

    "finetune" is fine-tuning's `best` tag (chosen on data.val), its last checkpoint when it has
    no validation; "finetune:latest" / "finetune:best" choose explicitly; "pretrain" is
    pretraining's last checkpoint (zero-shot)."""
    st = settings.eval
    data = fed + [_abs(d) for d in st.data]
    if not data:
        raise ConfigError("eval.data", "no eval data (set eval.data or a prep source with feeds: [eval])")
    if not st.checkpoints:
        raise ConfigError("eval.checkpoints", "empty")
    lines = []
    for ckpt in st.checkpoints:
        if ckpt == "finetune" and not finetune_validates:
            warnings.append(
                "eval of 'finetune': fine-tuning has no data.val (no `best` tag), evaluating its last checkpoint"
            )
            checkpoint = output = str(run_dir / "finetune")
        elif ckpt in ("finetune", "finetune:best"):
            checkpoint = str(run_dir / "finetune" / "checkpoints" / "best")
            output = str(run_dir / "finetune")  # metrics land in that run's eval/ folder
        elif ckpt == "pretrain":
            checkpoint = output = str(run_dir / "pretrain")
        elif ckpt == "finetune:latest":
            checkpoint, output = str(run_dir / "finetune"), str(run_dir / "eval" / "finetune_latest")
        else:
            checkpoint = _abs(ckpt)
            output = str(run_dir / "eval" / Path(checkpoint).stem)
        for d in data:
            line = [f"--checkpoint={checkpoint}", f"--data={d}", f"--output_dir={output}"]
            if st.k_test is not None:  # validated: set only for retrieval
                line.append(f"--k_test={st.k_test}")
            lines.append(line + [f"--{k}={_value(v)}" for k, v in st.overrides.items()])
    return lines


def _override_args(overrides: dict[str, Any], fed: dict[str, list[str]], key: str) -> list[str]:
    for name, folders in fed.items():
        if name in overrides:
            raise ConfigError(f"{key}.{name}", "also set by prep sources that feed it; keep one")
        # One folder goes as a plain path (a list field reads it as [path], a str field as is).
        overrides[name] = folders[0] if len(folders) == 1 else folders
    return [f"--{k}={_value(v)}" for k, v in overrides.items()]


def _common_args(settings: SlurmSettings, cpu: bool) -> list[str]:
    """Site options: account/qos for every job; partition + sbatch_args, or their cpu_* twins."""
    c = settings.cluster
    partition = c.cpu_partition if cpu else c.partition
    args = [
        f"--{name}={value}"
        for name, value in (("partition", partition), ("account", c.account), ("qos", c.qos))
        if value
    ]
    return args + list(c.cpu_sbatch_args if cpu else c.sbatch_args)


def _resource_args(r: Resources) -> list[str]:
    args = [f"--nodes={r.nodes}", f"--ntasks-per-node={r.ntasks_per_node}"]
    if r.gpus_per_node:
        args.append(f"--gpus-per-node={r.gpus_per_node}")
    args.append(f"--cpus-per-task={r.cpus_per_task}")
    if r.mem:
        args.append(f"--mem={r.mem}")
    return args + [f"--time={r.time}"]


def _export(settings: SlurmSettings) -> str:
    """--export=ALL plus the two variables the scripts read; ALL keeps the submitter's PATH/venv."""
    value = f"--export=ALL,ALBEF_CMD={settings.albef_command}"
    if settings.env_setup:
        value += f",ALBEF_ENV_SETUP={_abs(settings.env_setup)}"
    return value


def _value(v: Any) -> str:
    """A value as Fire parses it back: lists/dicts as JSON literals, the rest as text."""
    return json.dumps(v) if isinstance(v, list | dict | tuple) else str(v)


def _abs(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def dry_run_script(plan: Plan) -> str:
    """The runnable bash snippet `--dry_run` prints: write the task lists, then submit the chain."""
    lines = [
        f"# albef slurm submit --dry_run: nothing submitted, nothing written; run folder {plan.run_dir}",
        f"mkdir -p {shlex.quote(str(plan.run_dir / 'logs'))} {shlex.quote(str(plan.run_dir / 'slurm'))}",
    ]
    for path, text in plan.task_files.items():
        rows = " ".join(_ansi_c(row) for row in text.splitlines())
        lines.append(f"# task list (one line per array task): {path}")
        lines.append(f"printf '%s\\n' {rows} > {shlex.quote(str(path))}")
    return "\n".join(lines + [job.shell_line() for job in plan.jobs])


def _ansi_c(text: str) -> str:
    """A bash $'...' word: the TABs of a task line survive copy and paste as \\t."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\t", "\\t")
    return f"$'{escaped}'"


def live_jobs(run_dir: Path) -> list[str]:
    """Ids of the last submission's jobs in `run_dir` that are not final (none recorded: [])."""
    if not (run_dir / "slurm" / SUBMISSION_FILE).is_file() or shutil.which("scontrol") is None:
        return []
    try:
        infos = status(run_dir)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError):
        return []
    return [f"{i.stage} {i.job_id} {i.state}" for i in infos if not i.final]


def write_task_files(plan: Plan) -> None:
    """The array task lists (and the logs folder); atomic, so a running array never reads half a file."""
    (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    for path, text in plan.task_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- submitting


def submit_plan(plan: Plan) -> None:
    """sbatch every job in order, each after the previous; on a failure cancel what was submitted."""
    if shutil.which("sbatch") is None:
        raise SlurmSubmitError(
            "sbatch not found on PATH: submit from a SLURM login node, or use --dry_run to print the sbatch lines"
        )
    ids: dict[str, str] = {}
    for job in plan.jobs:
        argv = job.command(ids[job.after] if job.after else None)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            error = proc.stderr.strip() if proc.returncode != 0 else ""
        except (OSError, subprocess.TimeoutExpired) as err:
            proc, error = None, str(err)
        job_id = proc.stdout.strip().split(";")[0] if proc is not None and not error else ""
        if not error and not job_id.isdigit():
            error = f"unexpected sbatch output {proc.stdout!r}" if proc is not None else "no output"
        if error:
            cancelled = _cancel(list(ids.values()))
            raise SlurmSubmitError(
                f"sbatch failed for stage '{job.name}': {error}\n  command: {shlex.join(argv)}\n  {cancelled}"
            )
        job.job_id = ids[job.name] = job_id
    _write_submission(plan)


def _cancel(job_ids: list[str]) -> str:
    if not job_ids:
        return "nothing had been submitted"
    try:
        proc = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return f"cancelled the jobs already submitted: {' '.join(job_ids)}"
        error = proc.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        error = str(err)
    return f"could NOT cancel the jobs already submitted ({error}); cancel them yourself: scancel {' '.join(job_ids)}"


def _write_submission(plan: Plan) -> None:
    record = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(plan.run_dir),
        "jobs": [asdict(j) for j in plan.jobs],
    }
    path = plan.run_dir / "slurm" / SUBMISSION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def tensorboard_command(run_dir: Path) -> str:
    return f"tensorboard --logdir {shlex.quote(str(run_dir))} --port 6006"


def _print_submitted(plan: Plan) -> None:
    print(f"submitted {len(plan.jobs)} jobs; run folder {plan.run_dir}")
    for job in plan.jobs:
        kind = f"array of {job.array_size}" if job.array_size else "job"
        after = f"after {job.after}" if job.after else ""
        print(f"  {job.name:<11} {job.job_id:>8}  {kind:<12} {after}")
    ids = ",".join(j.job_id or "" for j in plan.jobs)
    print(f"logs:        {plan.run_dir / 'logs'}")
    print(f"queue:       squeue --jobs={ids}")
    print(
        f"tensorboard: {tensorboard_command(plan.run_dir)}   (from your machine: ssh -L 6006:localhost:6006 <login node>)"
    )


# ----------------------------------------------------------------------------- status


def status(run_dir: str | Path) -> list[JobInfo]:
    """The state of every job (array tasks one by one) of the last submission in `run_dir`."""
    record = json.loads((Path(run_dir) / "slurm" / SUBMISSION_FILE).read_text(encoding="utf-8"))
    infos: list[JobInfo] = []
    for job in record["jobs"]:
        infos += query_job(job["job_id"], job["name"], int(job.get("array_size") or 0))
    return infos


def query_job(job_id: str, stage: str, array_size: int = 0) -> list[JobInfo]:
    """One JobInfo per job or array task: `scontrol show job -o ID`, then for what scontrol no
    longer knows (purged MinJobAge after its end) `sacct`, then the job completion log.

    A job none of them knows is PURGED (final, outcome unknown); a job scontrol cannot be asked
    about (no controller) is UNKNOWN (not final: waiting goes on)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    purged = proc.returncode != 0 and "invalid job id" in proc.stderr.lower()
    if proc.returncode != 0 and not purged:  # no controller, or another failure: ask again later
        return [JobInfo(stage=stage, job_id=job_id, state="UNKNOWN", reason=proc.stderr.strip())]
    infos = (
        []
        if purged
        else [_from_fields(f, stage, job_id) for f in map(parse_scontrol_line, proc.stdout.splitlines()) if f]
    )
    if len(infos) < max(array_size, 1):  # all or some (array tasks) purged
        seen = {i.job_id for i in infos}
        for info in query_accounting(job_id, stage):
            if info.job_id not in seen:
                infos.append(info)
                seen.add(info.job_id)
    if not infos:
        infos = [
            JobInfo(
                stage=stage,
                job_id=job_id,
                state="PURGED",
                reason="ended; scontrol forgot it and there is no accounting or completion log to ask",
            )
        ]
    return sorted(infos, key=lambda i: [int(p) if p.isdigit() else 0 for p in re.split(r"[_\[\]-]", i.job_id)])


def _from_fields(fields: dict[str, str], stage: str, job_id: str) -> JobInfo:
    """A JobInfo from `scontrol show job -o` fields (the completion log has the same format)."""
    task = fields.get("ArrayTaskId")
    shown = f"{fields.get('ArrayJobId')}_{task}" if task else fields.get("JobId", job_id)
    return JobInfo(
        stage=stage,
        job_id=shown,
        state=fields.get("JobState", "UNKNOWN"),
        reason=fields.get("Reason", ""),
        exit_code=fields.get("ExitCode", ""),
        restarts=int(fields.get("Restarts", "0") or 0),
        log=fields.get("StdOut", ""),
    )


def query_accounting(job_id: str, stage: str) -> list[JobInfo]:
    """A finished job from `sacct` (one row per run with --duplicates: restarts = rows - 1), or,
    where accounting is disabled, from the job completion log. [] when neither knows it."""
    try:
        proc = subprocess.run(
            ["sacct", "--jobs", job_id, "--allocations", "--duplicates", "--noheader", "--parsable2",
             "--format=JobID,State,ExitCode"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode == 0:
        runs: dict[str, list[tuple[str, str]]] = {}
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 3 and parts[0]:
                runs.setdefault(parts[0], []).append((parts[1].split()[0] if parts[1] else "UNKNOWN", parts[2]))
        return [
            JobInfo(
                stage=stage,
                job_id=jid,
                state=rows[-1][0],
                exit_code=rows[-1][1],
                restarts=len(rows) - 1,
                reason="(sacct)",
            )
            for jid, rows in runs.items()
        ]
    return read_completion_log(job_id, stage)


def read_completion_log(job_id: str, stage: str) -> list[JobInfo]:
    """The job's records in the jobcomp/filetxt log (`scontrol show config`: JobCompLoc), if any.

    One record per run end (a requeued job has several); array tasks are matched by ArrayJobId."""
    proc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    config = dict(re.findall(r"^(JobComp\w+)\s*=\s*(.*?)\s*$", proc.stdout, re.M))
    path = Path(config.get("JobCompLoc", ""))
    if config.get("JobCompType") != "jobcomp/filetxt" or not path.is_file():
        return []
    found: dict[str, list[dict[str, str]]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = parse_scontrol_line(line)
        if job_id in (fields.get("JobId"), fields.get("ArrayJobId")):
            found.setdefault(_from_fields(fields, stage, job_id).job_id, []).append(fields)
    infos = []
    for records in found.values():
        info = _from_fields(records[-1], stage, job_id)
        info.restarts, info.reason = len(records) - 1, "(completion log)"
        infos.append(info)
    return infos


def parse_scontrol_line(line: str) -> dict[str, str]:
    """`Key=value Key2=value with spaces ...` -> dict; a value runs until the next ` Key=`."""
    parts = re.split(r"(?:^|\s)([A-Za-z][\w/:]*)=", line.strip())
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def wait(run_dir: str | Path, poll_s: float = 2.0, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> list[JobInfo]:
    """Poll until every job is final (or will never run); returns the last states.

    Raises TimeoutError (with the table) after `timeout_s`."""
    start = time.monotonic()
    while True:
        infos = status(run_dir)
        if all(i.final for i in infos):
            return infos
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"jobs still running after {timeout_s:.0f} s:\n{format_status(infos)}")
        time.sleep(poll_s)


def format_status(infos: list[JobInfo]) -> str:
    """A table, then one line naming what failed and what will never run because of it."""
    lines = [f"{'stage':<11} {'job':<10} {'state':<10} {'exit':<6} {'restarts':<8} reason"]
    for i in infos:
        lines.append(f"{i.stage:<11} {i.job_id:<10} {i.state:<10} {i.exit_code:<6} {i.restarts:<8} {i.reason}")
    failed = [i for i in infos if i.final and not i.ok and i.reason != NEVER_SATISFIED]
    never = [i for i in infos if i.reason == NEVER_SATISFIED]
    for i in failed:
        if i.state == "PURGED":
            lines.append(f"UNKNOWN OUTCOME: {i.stage} job {i.job_id} ended, {i.reason}; see its log in the run's logs/")
            continue
        lines.append(f"FAILED: {i.stage} job {i.job_id} ({i.state}, exit {i.exit_code}); log: {i.log}")
    if never:
        names = ", ".join(f"{i.stage} ({i.job_id})" for i in never)
        lines.append(f"NEVER RAN ({NEVER_SATISFIED}, an upstream job failed): {names}")
    if infos and all(i.ok for i in infos):
        lines.append("all jobs COMPLETED")
    return "\n".join(lines)
