"""Typed settings for `albef slurm submit`: cluster, resources per stage, data slices, stage configs.

Kept apart from the experiment configs on purpose: the same pretraining YAML runs on a laptop, under
torchrun or on SLURM; only this file says how many nodes, which partition and where the run lives.
Loaded by the one strict loader (pipeline/config/loader.py) as defaults <- YAML <- dotted CLI
overrides (`--pretrain.resources.nodes=8`, `--prep.sources.0.inputs=[a.tsv]`), then checked: an
unknown key, a wrong type or an impossible value is one `ConfigError` naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, apply_overrides, from_dict, read_yaml, resolve_config_file
from pipeline.config.paths import CONFIG_DIR

STAGES = ("prep", "pretrain", "ta", "finetune", "eval")  # the chain's order; any subset runs in it
# The downstream tasks: `albef finetune TASK` / `albef evaluate TASK` (pipeline/cli.py Finetune,
# Evaluate). The one list `finetune.task` and `eval.task` are checked against.
TASKS = ("retrieval", "ve", "vqa", "nlvr", "grounding")
# eval.checkpoints entries naming fine-tuning's output (the others: "pretrain", or a path).
FINETUNE_CHECKPOINTS = ("finetune", "finetune:best", "finetune:latest")
# SLURM time syntax: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_FEED_RE = re.compile(r"^(eval|(pretrain|ta|finetune):[A-Za-z_][\w.]*)$")


@dataclass
class Resources:
    """What one job of a stage asks SLURM for (one array task, for array stages)."""

    nodes: int = 1  # nodes per job
    ntasks_per_node: int = 1  # processes per node: one per GPU for training (srun starts them)
    gpus_per_node: int = 0  # GPUs per node; 0 = CPU job (no --gpus-per-node)
    cpus_per_task: int = 1  # CPU cores per process (data-loader workers + 1)
    mem: str | None = None  # memory per node, SLURM syntax ("480G"); None = cluster default
    time: str = "01:00:00"  # wall-clock limit, SLURM syntax (D-HH:MM:SS)
    max_parallel: int | None = None  # array stages: at most this many tasks at once (--array=1-N%M)
    sbatch_args: list[str] = field(default_factory=list)  # more sbatch options for this stage only


@dataclass
class ClusterSettings:
    """Site settings. account/qos go to every job; partition/sbatch_args to the training and eval
    jobs; the CPU jobs (prep array, prep check) get cpu_partition/cpu_sbatch_args instead, so GPU
    options (--exclusive, --gpu-bind, a GPU constraint) never reach them."""

    partition: str | None = None  # --partition of pretrain/finetune/eval
    account: str | None = None  # --account (the allocation charged), every job
    qos: str | None = None  # --qos, every job
    sbatch_args: list[str] = field(default_factory=list)  # pretrain/finetune/eval, e.g. ["--exclusive"]
    cpu_partition: str | None = None  # --partition of prep/prep_check; None = the cluster's default
    cpu_sbatch_args: list[str] = field(default_factory=list)  # prep/prep_check only


@dataclass
class PrepSource:
    """One source to ingest; one prep array task per entry of `inputs` (a file or a chunk of one)."""

    name: str = ""  # folder name under RUN/prep/ (chunks: RUN/prep/NAME/part-000, ...)
    source: str = ""  # the `albef prep SOURCE` (cc3m, coco, ..., snli_ve; see `albef prep --help`)
    inputs: list[str] = field(default_factory=list)  # input file(s) for --input
    options: dict[str, Any] = field(default_factory=dict)  # other `albef prep` flags: {split: test, ...}
    # where the folders go: "STAGE:KEY" (STAGE pretrain, ta or finetune; KEY a dotted config key:
    # "finetune:data.train", "finetune:data.val") or "eval" (the eval data, whatever eval.task)
    feeds: list[str] = field(default_factory=list)


@dataclass
class PrepStage:
    resources: Resources = field(default_factory=lambda: Resources(cpus_per_task=4, time="04:00:00"))
    sources: list[PrepSource] = field(default_factory=list)


@dataclass
class PretrainStage:
    resources: Resources = field(default_factory=Resources)
    config: str = "pretrain_tiny_cpu.yaml"  # experiment config: a path, or a name in pipeline/configs/
    overrides: dict[str, Any] = field(default_factory=dict)  # --a.b=value passed to `albef pretrain`
    # USR1 this many seconds before the time limit: must cover one step + one checkpoint save (+ up
    # to 60 s of SLURM's signal slack); see slurm/README.md "Grace time".
    preempt_grace_s: int = 300


@dataclass
class TAStage:
    """NLVR2's text-assignment pretraining (`albef pretrain --config nlvr_ta.yaml --checkpoint CK`):
    more pretraining from a pretrained model, before `finetune` with task nlvr. Runs through
    pretrain.sbatch into RUN/ta."""

    resources: Resources = field(default_factory=Resources)
    config: str = "nlvr_ta.yaml"  # a path, or a name in pipeline/configs/
    checkpoint: str | None = None  # weights to start from; None = this run's pretrain folder
    overrides: dict[str, Any] = field(default_factory=dict)  # --a.b=value passed to `albef pretrain`
    preempt_grace_s: int = 300  # as pretrain


@dataclass
class FinetuneStage:
    resources: Resources = field(default_factory=Resources)
    task: str = "retrieval"  # `albef finetune TASK`: one of TASKS
    config: str = "retrieval_tiny_cpu.yaml"  # a path, or a name in pipeline/configs/ (the task's config)
    # pretrained weights; None = this run's ta folder when `ta` is submitted with it, else its pretrain folder
    checkpoint: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    preempt_grace_s: int = 300  # as pretrain; a signal during validation stops it within a batch


@dataclass
class EvalStage:
    resources: Resources = field(default_factory=Resources)
    task: str | None = None  # `albef evaluate TASK`: one of TASKS; None = finetune.task
    # "finetune" = fine-tuning's `best` tag (its `latest` when it has no data.val), "finetune:latest",
    # "pretrain" = pretraining's latest; anything else is a path.
    checkpoints: list[str] = field(default_factory=lambda: ["finetune"])
    data: list[str] = field(default_factory=list)  # eval prep folders, besides prep sources fed to "eval"
    k_test: int | None = None  # retrieval only: ITM re-ranking depth; None = the stage's default
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class SlurmSettings:
    run_dir: str = "albef_slurm_run"  # everything of this run: prep/, pretrain/, finetune/, logs/, slurm/
    albef_command: str = "albef"  # how jobs start the CLI (e.g. "python -m pipeline.cli")
    env_setup: str | None = None  # file the job scripts source first (venv activate, module loads)
    scripts_dir: str | None = None  # folder with the *.sbatch files; None = this repo's slurm/
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    prep: PrepStage = field(default_factory=PrepStage)
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    ta: TAStage = field(default_factory=TAStage)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    eval: EvalStage = field(default_factory=EvalStage)


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SlurmSettings:
    """Defaults <- YAML file (a path, or a name in pipeline/configs/) <- dotted overrides, validated."""
    raw = read_yaml(path, "config") if path is not None else {}
    settings = from_dict(SlurmSettings, apply_overrides(SlurmSettings, raw, overrides or {}))
    validate(settings)
    return settings


def resolve_config_path(value: str, key: str) -> Path:
    """An existing file as given, else the same name in pipeline/configs/; absolute."""
    found = resolve_config_file(value)
    if found is None:
        raise ConfigError(key, f"no such file {value!r} (looked in the current folder and {CONFIG_DIR})")
    return found


def validate(s: SlurmSettings) -> None:
    """Impossible values fail here, before anything is written or submitted."""
    check_no_control_chars(s)
    for stage in STAGES:
        r: Resources = getattr(s, stage).resources
        key = f"{stage}.resources"
        for name in ("nodes", "ntasks_per_node", "cpus_per_task"):
            if getattr(r, name) < 1:
                raise ConfigError(f"{key}.{name}", f"must be >= 1, got {getattr(r, name)}")
        if r.gpus_per_node < 0:
            raise ConfigError(f"{key}.gpus_per_node", f"must be >= 0, got {r.gpus_per_node}")
        if not _TIME_RE.match(r.time):
            raise ConfigError(f"{key}.time", f"{r.time!r} is not SLURM time syntax (e.g. 2-00:00:00, 04:00:00, 90)")
        if r.max_parallel is not None and r.max_parallel < 1:
            raise ConfigError(f"{key}.max_parallel", f"must be >= 1, got {r.max_parallel}")
    for stage in ("pretrain", "ta", "finetune", "eval"):
        check_gpu_binding(getattr(s, stage).resources, s.cluster.sbatch_args, f"{stage}.resources")
    for stage in ("pretrain", "ta", "finetune"):
        if getattr(s, stage).preempt_grace_s < 1:
            raise ConfigError(f"{stage}.preempt_grace_s", "must be >= 1 second")
    check_tasks(s)
    if "," in s.albef_command or (s.env_setup and "," in s.env_setup):
        raise ConfigError("albef_command/env_setup", "no commas (they travel in sbatch --export)")
    seen: set[str] = set()
    for i, src in enumerate(s.prep.sources):
        key = f"prep.sources.{i}"
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", src.name):
            raise ConfigError(f"{key}.name", f"{src.name!r} must be a plain folder name")
        if src.name in seen:
            raise ConfigError(f"{key}.name", f"{src.name!r} used twice")
        seen.add(src.name)
        if not src.source:
            raise ConfigError(f"{key}.source", "missing (the `albef prep` source, e.g. cc3m)")
        if not src.inputs:
            raise ConfigError(f"{key}.inputs", "at least one input file")
        for name in ("input", "output"):
            if name in src.options:
                raise ConfigError(f"{key}.options.{name}", "set by the submitter (use inputs / name)")
        for feed in src.feeds:
            if not _FEED_RE.match(feed):
                raise ConfigError(
                    f"{key}.feeds", f"{feed!r} is not 'pretrain:<key>', 'ta:<key>', 'finetune:<key>' or 'eval'"
                )


def eval_task(s: SlurmSettings) -> str:
    """The task `albef evaluate` runs: eval.task, else fine-tuning's."""
    return s.eval.task or s.finetune.task


def check_tasks(s: SlurmSettings) -> None:
    """Task names from TASKS; options that only one task has are not given to another; fine-tuning's
    checkpoint is evaluated only by the task it was fine-tuned for."""
    for key, task in (("finetune.task", s.finetune.task), ("eval.task", s.eval.task)):
        if task is not None and task not in TASKS:
            raise ConfigError(key, f"{task!r} is not a task; choose one of {', '.join(TASKS)}")
    task = eval_task(s)
    if s.eval.k_test is not None and task != "retrieval":
        raise ConfigError("eval.k_test", f"retrieval only (eval task is {task!r}); set task options in eval.overrides")
    if "pretrain" in s.eval.checkpoints and task != "retrieval":
        raise ConfigError(
            "eval.checkpoints",
            f"'pretrain' is retrieval's zero-shot evaluation; a pretraining checkpoint has no {task!r} head "
            "(list its path to evaluate it anyway)",
        )
    tuned = [c for c in s.eval.checkpoints if c in FINETUNE_CHECKPOINTS]
    if tuned and task != s.finetune.task:
        raise ConfigError(
            "eval.task",
            f"{task!r} would evaluate {tuned[0]!r}, a {s.finetune.task!r} model (finetune.task); "
            "evaluate it with its own task or list checkpoint paths",
        )
    for key, overrides in (("ta.overrides", s.ta.overrides), ("finetune.overrides", s.finetune.overrides)):
        if "checkpoint" in overrides:
            raise ConfigError(f"{key}.checkpoint", f"set {key.split('.')[0]}.checkpoint instead")


_GRES_GPU_RE = re.compile(r"^--gres=(?:.*,)?gpu(?::[^:,]+)?:(\d+)(?:,|$)")


def check_gpu_binding(r: Resources, cluster_args: list[str], key: str) -> None:
    """One rank per GPU: tasks per node must equal GPUs per node (given as gpus_per_node or as
    --gres=gpu[:type]:N in sbatch_args). Each rank takes GPU `local_rank % visible GPUs`
    (pipeline/runtime/distributed.py), so with fewer tasks GPUs idle and with more, ranks share one."""
    gpus = r.gpus_per_node
    source = "gpus_per_node"
    for arg in [*cluster_args, *r.sbatch_args]:
        match = _GRES_GPU_RE.match(arg)
        if match:
            gpus, source = int(match.group(1)), arg
    if gpus and r.ntasks_per_node != gpus:
        raise ConfigError(
            f"{key}.ntasks_per_node",
            f"{r.ntasks_per_node} tasks per node but {gpus} GPUs per node ({source}): training and eval "
            "run one rank per GPU, set both to the node's GPU count",
        )


def check_no_control_chars(value: Any, key: str = "") -> None:
    """No TAB, newline or carriage return anywhere: the array task lists are one TAB-separated
    line per task, so such a character would split an argument or inject a task."""
    if isinstance(value, str):
        bad = [name for char, name in (("\t", "TAB"), ("\n", "newline"), ("\r", "carriage return")) if char in value]
        if bad:
            raise ConfigError(key or "settings", f"{value!r} contains a {bad[0]}, which the task lists cannot carry")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_no_control_chars(str(k), f"{key}.{k}" if key else str(k))
            check_no_control_chars(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_no_control_chars(v, f"{key}.{i}")
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            check_no_control_chars(getattr(value, name), f"{key}.{name}" if key else name)
