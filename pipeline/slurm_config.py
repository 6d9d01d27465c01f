"""Typed settings for `albef slurm submit`: cluster, resources per stage, data slices, stage configs.

Kept apart from the experiment configs on purpose: the same pretraining YAML runs on a laptop, under
torchrun or on SLURM; only this file says how many nodes, which partition and where the run lives.
Loaded as defaults <- YAML <- dotted CLI overrides (`--pretrain.resources.nodes=8`), then checked:
an unknown key, a wrong type or an impossible value is one `SlurmConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
REPO_SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"
STAGES = ("prep", "pretrain", "finetune", "eval")
# SLURM time syntax: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_FLAT_MAPS = ("overrides", "options")  # dict fields whose keys are flags of a stage command
_FEED_RE = re.compile(r"^(eval|(pretrain|finetune):[A-Za-z_][\w.]*)$")


class SlurmConfigError(ValueError):
    """A bad SLURM settings file or override; the message names the key."""


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
    """Site settings added to every job."""

    partition: str | None = None  # --partition
    account: str | None = None  # --account (the allocation charged)
    qos: str | None = None  # --qos
    sbatch_args: list[str] = field(default_factory=list)  # e.g. ["--constraint=a100", "--exclusive"]


@dataclass
class PrepSource:
    """One source to ingest; one prep array task per entry of `inputs` (a file or a chunk of one)."""

    name: str = ""  # folder name under RUN/prep/ (chunks: RUN/prep/NAME/part-000, ...)
    source: str = ""  # the `albef prep SOURCE` (cc3m, cc12m, sbu, coco, vg, flickr30k, generic)
    inputs: list[str] = field(default_factory=list)  # input file(s) for --input
    options: dict[str, Any] = field(default_factory=dict)  # other `albef prep` flags: {split: test, ...}
    feeds: list[str] = field(default_factory=list)  # where the folders go: "pretrain:data.train", "eval", ...


@dataclass
class PrepStage:
    resources: Resources = field(default_factory=lambda: Resources(cpus_per_task=4, time="04:00:00"))
    sources: list[PrepSource] = field(default_factory=list)


@dataclass
class PretrainStage:
    resources: Resources = field(default_factory=Resources)
    config: str = "pretrain_tiny_cpu.yaml"  # experiment config: a path, or a name in pipeline/configs/
    overrides: dict[str, Any] = field(default_factory=dict)  # --a.b=value passed to `albef pretrain`
    preempt_grace_s: int = 120  # USR1 this many seconds before the time limit (checkpoint, requeue)


@dataclass
class FinetuneStage:
    resources: Resources = field(default_factory=Resources)
    config: str = "retrieval_tiny_cpu.yaml"  # a path, or a name in pipeline/configs/
    checkpoint: str | None = None  # pretrained weights; None = this run's pretrain folder
    overrides: dict[str, Any] = field(default_factory=dict)
    preempt_grace_s: int = 120


@dataclass
class EvalStage:
    resources: Resources = field(default_factory=Resources)
    # "finetune" / "pretrain" = that stage's run folder in this run; anything else is a path.
    checkpoints: list[str] = field(default_factory=lambda: ["finetune"])
    data: list[str] = field(default_factory=list)  # eval prep folders, besides prep sources fed to "eval"
    k_test: int | None = None  # ITM re-ranking depth; None = the stage's default
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
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    eval: EvalStage = field(default_factory=EvalStage)


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SlurmSettings:
    """Defaults <- YAML file (a path, or a name in pipeline/configs/) <- dotted overrides, validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(str(path), "config")
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise SlurmConfigError(f"{file}: the top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    settings = _build(SlurmSettings, raw, "")
    validate(settings)
    return settings


def resolve_config_path(value: str, key: str) -> Path:
    """An existing file as given, else the same name in pipeline/configs/; absolute."""
    for candidate in (Path(value).expanduser(), CONFIG_DIR / value):
        if candidate.is_file():
            return candidate.resolve()
    raise SlurmConfigError(f"{key}: no such file {value!r} (looked in the current folder and {CONFIG_DIR})")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """`a.b.c=v` into nested dicts; a numeric part indexes a list (prep.sources.0.inputs)."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if part in _FLAT_MAPS and isinstance(node, dict):
            # `pretrain.overrides.train.max_steps=5` -> overrides["train.max_steps"] = 5: these maps hold
            # another program's flags, whose dotted names must stay whole.
            target = node.setdefault(part, {})
            if not isinstance(target, dict):
                raise SlurmConfigError(f"{key}: {'.'.join(parts[:i + 1])} is not a mapping")
            target[".".join(parts[i + 1:])] = value
            return
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SlurmConfigError(f"{key}: {'.'.join(parts[:i + 1])} is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise SlurmConfigError(f"{key}: {'.'.join(parts[:i + 1])} is not a section")
    if isinstance(node, list):
        if not parts[-1].isdigit() or int(parts[-1]) >= len(node):
            raise SlurmConfigError(f"{key}: not an index of a list of {len(node)}")
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Strictly turn nested dicts into the dataclass `cls`; errors name the dotted key."""
    if not isinstance(raw, dict):
        raise SlurmConfigError(f"{prefix or 'settings'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SlurmConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is list:
        if isinstance(value, str | tuple):  # a CLI value "a,b" or Fire's tuple
            value = list(value.split(",")) if isinstance(value, str) else list(value)
        if not isinstance(value, list):
            raise SlurmConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SlurmConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)  # YAML reads `time: 60` or `partition: 123` as numbers
    raise SlurmConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def validate(s: SlurmSettings) -> None:
    """Impossible values fail here, before anything is written or submitted."""
    for stage in STAGES:
        r: Resources = getattr(s, stage).resources
        key = f"{stage}.resources"
        for name in ("nodes", "ntasks_per_node", "cpus_per_task"):
            if getattr(r, name) < 1:
                raise SlurmConfigError(f"{key}.{name}: must be >= 1, got {getattr(r, name)}")
        if r.gpus_per_node < 0:
            raise SlurmConfigError(f"{key}.gpus_per_node: must be >= 0, got {r.gpus_per_node}")
        if not _TIME_RE.match(r.time):
            raise SlurmConfigError(f"{key}.time: {r.time!r} is not SLURM time syntax (e.g. 2-00:00:00, 04:00:00, 90)")
        if r.max_parallel is not None and r.max_parallel < 1:
            raise SlurmConfigError(f"{key}.max_parallel: must be >= 1, got {r.max_parallel}")
    for stage in ("pretrain", "finetune"):
        if getattr(s, stage).preempt_grace_s < 1:
            raise SlurmConfigError(f"{stage}.preempt_grace_s: must be >= 1 second")
    if "," in s.albef_command or (s.env_setup and "," in s.env_setup):
        raise SlurmConfigError("albef_command/env_setup: no commas (they travel in sbatch --export)")
    seen: set[str] = set()
    for i, src in enumerate(s.prep.sources):
        key = f"prep.sources.{i}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", src.name):
            raise SlurmConfigError(f"{key}.name: {src.name!r} must be a plain folder name")
        if src.name in seen:
            raise SlurmConfigError(f"{key}.name: {src.name!r} used twice")
        seen.add(src.name)
        if not src.source:
            raise SlurmConfigError(f"{key}.source: missing (the `albef prep` source, e.g. cc3m)")
        if not src.inputs:
            raise SlurmConfigError(f"{key}.inputs: at least one input file")
        for name in ("input", "output"):
            if name in src.options:
                raise SlurmConfigError(f"{key}.options.{name}: set by the submitter (use inputs / name)")
        for feed in src.feeds:
            if not _FEED_RE.match(feed):
                raise SlurmConfigError(f"{key}.feeds: {feed!r} is not 'pretrain:<key>', 'finetune:<key>' or 'eval'")
