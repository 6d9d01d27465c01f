"""Experiment configs: precedence, Fire/YAML spellings, bundled files, and one clear error per bad key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import (
    CONFIG_DIR,
    REPO_ROOT,
    ConfigError,
    apply_overrides,
    build_model_config,
    from_dict,
    load_config,
    to_yaml,
)
from pipeline.runtime.distributed import DistInfo
from pipeline.runtime.ds_config import build_ds_config, precision_of
from pipeline.stages.pretrain import PretrainConfig, check_pretrain_runtime
from pipeline.train.geometry import derive_geometry

DATA = {"data.train": "[/data/a,/data/b]"}  # Fire hands a bracketed list over as a string


def _info(world_size: int) -> DistInfo:
    return DistInfo(0, world_size, 0, world_size, "127.0.0.1", 29500, "torchrun")


@pytest.mark.parametrize("name", ["pretrain_4m", "pretrain_14m", "pretrain_tiny_cpu"])
def test_bundled_configs_load_and_build_a_model_config(name: str) -> None:
    cfg = load_config(PretrainConfig, name, DATA)
    assert cfg.data.train == ["/data/a", "/data/b"]
    mcfg = build_model_config(cfg.model, seed=cfg.train.seed)
    assert mcfg.queue_size == cfg.model.queue_size and mcfg.vision.image_size == cfg.model.image_res


def test_paper_values_in_4m_config() -> None:
    cfg = load_config(PretrainConfig, CONFIG_DIR / "pretrain_4m.yaml", DATA)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.optim.weight_decay) == (64, 30, 1e-4, 0.02)
    assert (cfg.optim.warmup_lr, cfg.optim.min_lr, cfg.optim.grad_clip, cfg.train.alpha) == (1e-5, 1e-5, 0.0, 0.4)
    assert (cfg.model.queue_size, cfg.model.momentum, cfg.model.image_res, cfg.model.preset) == (
        65536,
        0.995,
        256,
        "base",
    )
    assert cfg.deepspeed.config.endswith("zero2_fp16.json")


def test_precedence_defaults_yaml_cli(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "train:\n  batch_size: 16\n  max_steps: 7\noptim:\n  lr: 1e-4\n"
    )  # YAML 1.1 reads 1e-4 as a str
    cfg = load_config(
        PretrainConfig,
        yaml_file,
        {
            **DATA,
            "model.init": "scratch",
            "train.max_steps": 20,
            "optim.betas": (0.9, 0.98),
            "train.max-consecutive-skips": 5,
        },
    )
    assert cfg.train.batch_size == 16  # YAML over default
    assert cfg.train.max_steps == 20  # CLI over YAML
    assert cfg.train.epochs == 30  # default kept
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.train.max_consecutive_skips == 5  # dashes accepted as Fire does


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"train.batchsize": 8}, "train.batchsize"),  # unknown key
        ({"trian.batch_size": 8}, "trian"),  # unknown section
        ({"train": 5}, "train"),  # a section replaced by a value
        ({"train.batch_size": "eight"}, "train.batch_size"),  # wrong type
        ({"train.batch_size": True}, "train.batch_size"),  # bool is not an int
        ({"train.batch_size": 0}, "train.batch_size"),  # out of range
        ({"train.max_steps": 2.5}, "train.max_steps"),  # float for an int
        ({"train.keep_last": 0}, "train.keep_last"),
        ({"train.device": "tpu"}, "train.device"),  # not in the Literal
        ({"model.preset": "huge"}, "model.preset"),
        ({"model.momentum": 1.0}, "model.momentum"),
        ({"model.image_res": 100}, "model.image_res"),  # not a multiple of the patch size
        ({"optim.warmup_lr": 1.0}, "optim.warmup_lr"),  # above the peak LR
        ({"optim.betas": (0.9,)}, "optim.betas"),  # wrong length
        ({"optim.betas": "0.9,x"}, "optim.betas[1]"),
        ({"optim.grad_clip": -1.0}, "optim.grad_clip"),
        ({"data.train": "[]"}, "data.train"),  # empty source list
        ({"data.weights": "[1.0]"}, "data.weights"),  # one weight for two sources
        ({"data.vocab": "/nonexistent/vocab.txt"}, "data.vocab"),
        ({"deepspeed.config": "ds_configs/nope.json"}, "deepspeed.config"),
        ({"logging.progress_bar": "maybe"}, "logging.progress_bar"),
    ],
)
def test_bad_config_names_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, "pretrain_tiny_cpu", {**DATA, **overrides})
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'train.batch_size'"):
        load_config(PretrainConfig, "pretrain_tiny_cpu", {**DATA, "train.batchsize": 8})


def _write_ds(tmp_path: Path, body: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    return str(path)


@pytest.mark.parametrize(
    "ds_body, device, world, overrides, key, text",
    [
        (None, "cpu", 2, {"deepspeed.config": "ds_configs/zero2_fp16.json"}, "deepspeed.config", "fp16"),
        ({"train_batch_size": 999}, "cpu", 2, {}, "deepspeed.config", "train_batch_size"),
        ({"gradient_clipping": 1.0}, "cpu", 2, {}, "deepspeed.config", "gradient_clipping"),
        ({"zero_optimization": {"stage": 3}}, "cpu", 2, {}, "deepspeed.config", "stage 3"),
        ({"scheduler": {"type": "WarmupLR"}}, "cpu", 2, {}, "deepspeed.config", "scheduler"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "cpu", 2, {}, "deepspeed.config", "optim.lr"),
        (None, "cpu", 3, {}, "model.queue_size", "32 x 3 = 96"),  # 64 % 96 != 0
        (None, "cpu", 1, {"data.train": "[/nonexistent/prep]"}, "data.train[0]", "manifest.json"),
    ],
)
def test_impossible_runtime_combinations(tmp_path, ds_body, device, world, overrides, key, text) -> None:
    extra = dict(overrides)
    if ds_body is not None:
        extra["deepspeed.config"] = _write_ds(tmp_path, ds_body)
    data_dir = tmp_path / "prep"
    data_dir.mkdir()
    (data_dir / "manifest.json").write_text("{}")
    cfg = load_config(PretrainConfig, "pretrain_tiny_cpu", {"data.train": f"[{data_dir}]", **extra})
    with pytest.raises(ConfigError) as err:
        check_pretrain_runtime(cfg, _info(world), device)
        geometry = derive_geometry(
            cfg.train, cfg.optim, world_size=world, samples_per_epoch=10_000, queue_size=cfg.model.queue_size
        )
        build_ds_config(cfg.deepspeed.config, geometry=geometry, optim=cfg.optim, device=device)
    assert err.value.key == key and text in str(err.value)


def test_ds_config_gets_the_experiment_values() -> None:
    cfg = load_config(PretrainConfig, "pretrain_4m", {**DATA, "train.grad_accum_steps": 2, "optim.grad_clip": 1.5})
    geometry = derive_geometry(cfg.train, cfg.optim, world_size=8, samples_per_epoch=10**6)
    ds = build_ds_config(cfg.deepspeed.config, geometry=geometry, optim=cfg.optim, device="cuda")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        64,
        2,
        1024,
    )
    assert ds["gradient_clipping"] == 1.5
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.02
    params = ds["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True  # torch's fused AdamW: nothing to JIT-compile
    assert precision_of(ds) == "fp16" and ds["zero_optimization"]["stage"] == 2
    cpu = load_config(PretrainConfig, "pretrain_tiny_cpu", DATA)
    geometry = derive_geometry(cpu.train, cpu.optim, world_size=2, samples_per_epoch=1000)
    ds_cpu = build_ds_config(cpu.deepspeed.config, geometry=geometry, optim=cpu.optim, device="cpu")
    # the CPU config trains under bf16 autocast over an fp32 engine (ds_configs/cpu_bf16.json)
    assert (
        precision_of(ds_cpu) == "bf16" and "bf16" not in ds_cpu and ds_cpu["optimizer"]["params"]["torch_adam"] is True
    )
    assert ds_cpu["gradient_clipping"] == 0.0  # explicit: DeepSpeed would default to 1.0


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, "pretrain_tiny_cpu", {**DATA, "optim.betas": "0.8,0.9"})
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg


def test_apply_overrides_is_a_copy() -> None:
    base = {"train": {"batch_size": 4}}
    merged = apply_overrides(PretrainConfig, base, {"train.seed": 3})
    assert base == {"train": {"batch_size": 4}} and merged["train"] == {"batch_size": 4, "seed": 3}
    assert from_dict(PretrainConfig, merged).train.seed == 3


def test_cli_bad_key_exits_2_naming_the_key(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "pretrain",
            "--config",
            "pretrain_tiny_cpu",
            "--output_dir",
            str(tmp_path / "run"),
            "--data.train=[/data/a]",
            "--train.batchsize=4",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.batchsize" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the config is valid
