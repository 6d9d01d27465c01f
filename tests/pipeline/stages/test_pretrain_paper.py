"""Pretraining as the paper: initial weights (model.init), masking, momentum dropout, evaluation resolution.

Offline: local weights are made here (a timm ViT and a BertForMaskedLM of the tiny preset's sizes);
hub access is forced to fail with HF_HUB_OFFLINE and an empty cache.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from pipeline.config import CONFIG_DIR, ConfigError, build_model_config, load_config, to_dict
from pipeline.data.text import tokenize
from pipeline.retrieval.evaluate import infer_model_config
from pipeline.runtime.distributed import DistInfo
from pipeline.runtime.io import LoadedCheckpoint
from pipeline.stages.finetune_retrieval import RetrievalConfig
from pipeline.stages.pretrain import PretrainConfig, PretrainTask, check_pretrain_runtime, pretrain


@pytest.fixture(autouse=True)
def _restore_logging():
    """The stages call setup_logging (basicConfig force=True) in-process: put the root logger back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def prep_dir(tmp_path: Path) -> Path:
    """Passes the start-up folder check (the weights are checked after it, before the data is read)."""
    folder = tmp_path / "prep"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> None:
    """No hub: HF_HUB_OFFLINE=1 (the environment variable and the constant read at import) and an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


def _info() -> DistInfo:
    return DistInfo(0, 1, 0, 1, "127.0.0.1", 29500, "torchrun")


def _tiny(prep: Path, **overrides: object) -> PretrainConfig:
    return load_config(PretrainConfig, "pretrain_tiny_cpu", {"data.train": f"[{prep}]", **overrides})


@pytest.fixture
def tiny_weights(tmp_path: Path, prep_dir: Path) -> dict[str, Path]:
    """A timm ViT file at a lower resolution and an HF BERT folder, both of the tiny preset's sizes."""
    mcfg = build_model_config(_tiny(prep_dir).model, seed=0)
    v, t = mcfg.vision, mcfg.text
    torch.manual_seed(1)
    vit = VisionTransformer(
        img_size=2 * v.patch_size,  # a 2 x 2 grid: resampled to the training resolution on load
        patch_size=v.patch_size,
        embed_dim=v.width,
        depth=v.depth,
        num_heads=v.num_heads,
        mlp_ratio=v.mlp_ratio,
        qkv_bias=True,
        num_classes=10,
        norm_layer=partial(nn.LayerNorm, eps=v.layer_norm_eps),
    )
    vision = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), vision)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            type_vocab_size=t.type_vocab_size,
            layer_norm_eps=t.layer_norm_eps,
        )
    )
    text = tmp_path / "bert"
    bert.save_pretrained(text)
    return {"vision": vision, "text": text}


# -- configs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pretrain_4m", "pretrain_14m"])
def test_paper_configs_start_from_deit_and_bert(name: str, prep_dir: Path) -> None:
    cfg = load_config(PretrainConfig, name, {"data.train": f"[{prep_dir}]"})  # hub names pass validation
    m = cfg.model
    assert (m.init, m.vision_weights, m.text_weights) == ("pretrained", "deit_base_patch16_224", "bert-base-uncased")
    assert (m.momentum_dropout, m.eval_image_res) == (True, 384)
    assert build_model_config(m, seed=0).momentum_dropout is True
    tiny = _tiny(prep_dir)
    assert (tiny.model.init, tiny.model.momentum_dropout) == ("scratch", False)
    cluster = yaml.safe_load((CONFIG_DIR / "slurm_cluster.yaml").read_text())
    assert cluster["pretrain"]["config"] == "pretrain_4m.yaml"


@pytest.mark.parametrize("name", ["retrieval_coco", "retrieval_flickr"])
def test_paper_retrieval_configs_use_the_official_schedule(name: str) -> None:
    cfg = load_config(RetrievalConfig, name)
    assert (cfg.optim.schedule, cfg.model.momentum_dropout) == ("per_epoch_cosine", True)


@pytest.mark.parametrize(
    ("overrides", "key", "text"),
    [
        ({"model.init": "pretrained"}, "model.vision_weights", "model.init: scratch"),
        ({"model.init": "pretrained", "model.vision_weights": "deit_base_patch16_224"}, "model.text_weights", "set"),
        ({"model.vision_weights": "deit_base_patch16_224"}, "model.vision_weights", "must be null"),
        (
            {"model.init": "pretrained", "model.vision_weights": "/nonexistent/deit.pth", "model.text_weights": "x"},
            "model.vision_weights",
            "not found",
        ),
        (
            {
                "model.init": "pretrained",
                "model.vision_weights": "no_such_vit",
                "model.text_weights": "bert-base-uncased",
            },
            "model.vision_weights",
            "timm model name",
        ),
        (
            {
                "model.init": "pretrained",
                "model.vision_weights": "vit_tiny_patch16_224",
                "model.text_weights": "./bert",
            },
            "model.text_weights",
            "not found",
        ),
        ({"model.init": "random"}, "model.init", "one of"),
        ({"model.eval_image_res": 100}, "model.eval_image_res", "multiple"),
    ],
)
def test_init_fields_are_checked_at_load(prep_dir: Path, overrides: dict, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        _tiny(prep_dir, **overrides)
    assert err.value.key == key and text in str(err.value), str(err.value)


# -- reading the weights at start-up -----------------------------------------------------------------------


def test_unreachable_hub_is_exit_2_naming_the_key_before_anything_is_written(
    offline, prep_dir: Path, tiny_weights: dict[str, Path], tmp_path: Path, capfd
) -> None:
    local_vit_hub_bert = {
        "model.init": "pretrained",
        "model.vision_weights": str(tiny_weights["vision"]),
        "model.text_weights": "bert-base-uncased",
    }
    cfg = _tiny(prep_dir, **local_vit_hub_bert)
    with pytest.raises(ConfigError) as err:
        check_pretrain_runtime(cfg, _info(), "cpu", PretrainTask(cfg))
    assert err.value.key == "model.text_weights" and "bert-base-uncased" in str(err.value)

    run = tmp_path / "run"
    code = pretrain("pretrain_4m", str(run), overrides={"data.train": f"[{prep_dir}]"})  # DeiT by timm name
    assert code == 2 and not run.exists()
    assert "config key 'model.vision_weights'" in capfd.readouterr().err


def test_local_weights_initialise_the_model_at_start_up(prep_dir: Path, tiny_weights: dict[str, Path]) -> None:
    cfg = _tiny(
        prep_dir,
        **{
            "model.init": "pretrained",
            "model.vision_weights": str(tiny_weights["vision"]),
            "model.text_weights": str(tiny_weights["text"]),
        },
    )
    task = PretrainTask(cfg)
    check_pretrain_runtime(cfg, _info(), "cpu", task)  # reads and converts both
    weights = task.initial_weights()
    assert weights is not None and weights.reports["vision"].interpolated == ["pos_embed"]
    model = task.build_model()
    vit = torch.load(tiny_weights["vision"], weights_only=True)
    assert torch.equal(model.visual_encoder.blocks[0].attn.qkv.weight, vit["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.visual_encoder_m.blocks[0].attn.qkv.weight, vit["blocks.0.attn.qkv.weight"])
    bert = BertForMaskedLM.from_pretrained(str(tiny_weights["text"])).state_dict()
    ours = model.text_encoder.state_dict()
    assert torch.equal(
        ours["encoder.layer.0.attention.self.query.weight"], bert["bert.encoder.layer.0.attention.self.query.weight"]
    )
    assert torch.equal(ours["cls.predictions.transform.dense.weight"], bert["cls.predictions.transform.dense.weight"])


def test_scratch_warns_and_the_resolved_config_says_so(prep_dir: Path, caplog) -> None:
    cfg = _tiny(prep_dir)
    assert to_dict(cfg)["model"]["init"] == "scratch"  # the run's config.yaml and TensorBoard config text
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.pretrain"):
        PretrainTask(cfg).build_model()
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)


# -- masking and evaluation resolution ---------------------------------------------------------------------


def test_sep_is_maskable_pad_and_cls_never(prep_dir: Path) -> None:
    task = PretrainTask(_tiny(prep_dir))
    tok = task.tokenizer
    ids, mask = tokenize(tok, ["a red circle", "a small blue square at the top left of the picture"], 25)
    batch = {"image": torch.zeros(2, 3, 8, 8), "input_ids": ids.repeat(200, 1), "attention_mask": mask.repeat(200, 1)}
    torch.manual_seed(0)
    labels = task.model_inputs(batch, torch.device("cpu"))["mlm_labels"]
    masked = labels != -100
    original = batch["input_ids"]
    assert not masked[original == tok.pad_token_id].any() and not masked[original == tok.cls_token_id].any()
    sep_rate = masked[original == tok.sep_token_id].float().mean().item()
    assert 0.08 < sep_rate < 0.22  # the official mask() excludes only [PAD] and [CLS]: 15% of [SEP]s


def test_zero_shot_evaluation_uses_the_runs_eval_resolution(prep_dir: Path) -> None:
    cfg = _tiny(prep_dir, **{"model.eval_image_res": 96})
    extra = PretrainTask(cfg).export_extra()
    assert extra["eval_image_res"] == 96 and extra["model_config"]["vision"]["image_size"] == cfg.model.image_res
    loaded = LoadedCheckpoint({}, extra["model_config"], 10, "deepspeed", "x", eval_image_res=extra["eval_image_res"])
    assert infer_model_config(loaded, "auto", None).vision.image_size == 96
    assert infer_model_config(loaded, "auto", 128).vision.image_size == 128  # --image_res wins
    unset = PretrainTask(_tiny(prep_dir)).export_extra()
    assert unset["eval_image_res"] == cfg.model.image_res  # null = the training resolution
