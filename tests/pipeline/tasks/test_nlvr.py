"""NLVR2 pipeline pieces: image pairs and labels through the loaders, the batched evaluation against a
per-sentence reference, the checkpoint kinds each model accepts, the official NLVR checkpoint through
the stage's load and logits path (parity with the official code's fixture), the stage configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_prep.synthetic_nlvr import write_synthetic_nlvr
from model import config_from_official
from model.albef import build_albef
from model.config import ALBEFConfig
from model.heads.nlvr import TAConfig, build_nlvr, build_text_assignment
from model.heads.ve import ClassifierConfig
from pipeline.config import load_config
from pipeline.data import build_eval_loader, build_train_loader
from pipeline.data.text import build_tokenizer, pre_caption, tokenize
from pipeline.runtime.io import read_checkpoint
from pipeline.stages.finetune_nlvr import NLVRConfig, NLVRTask
from pipeline.stages.pretrain import PretrainConfig
from pipeline.tasks.metrics import classification_accuracy
from pipeline.tasks.nlvr import (
    NLVREvalConfig,
    build_nlvr_from_checkpoint,
    build_ta_from_checkpoint,
    evaluate_nlvr_model,
    label_ids,
    nlvr_logits,
)

from pipeline_testutils import write_nlvr_split

ATOL = 1e-5  # the heads parity tolerance (tests/model/heads/test_nlvr_parity.py)


@pytest.fixture
def nlvr_split(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A 6-pair split with 2 sentences each, and {identifier: (cleaned sentence, label)}."""
    synth = write_synthetic_nlvr(tmp_path / "raw", splits={"test": 6}, image_size=32)
    truth = {}
    for line in synth.jsonl["test"].read_text().splitlines():
        r = json.loads(line)
        truth[r["identifier"]] = (pre_caption(r["sentence"], 30), r["label"])
    return write_nlvr_split(tmp_path / "test", synth.jsonl["test"], synth.image_root), truth


def tiny_backbone() -> ALBEFConfig:
    return ALBEFConfig.tiny(image_size=32, embed_dim=32, queue_size=64)


def tiny_nlvr(distill: bool = False) -> torch.nn.Module:
    return build_nlvr(ClassifierConfig(backbone=tiny_backbone(), num_classes=2, distill=distill)).eval()


def test_label_ids() -> None:
    assert label_ids(["False", "True", True, 0, 1]).tolist() == [0, 1, 1, 0, 1]
    for bad in ("true", 2, None, "maybe"):
        with pytest.raises(ValueError, match="not an NLVR2 label"):
            label_ids([bad])


def test_loaders_carry_both_images_and_the_label(nlvr_split) -> None:
    data, truth = nlvr_split
    train = build_train_loader(
        [data], batch_size=4, rank=0, world_size=1, num_workers=0, seed=3, start_step=0, image_res=32,
        tokenizer=build_tokenizer(), max_len=30, num_steps=3, shuffle_buffer=4, finetune=True,
    )  # fmt: skip
    for batch in train:
        assert batch["image"].shape == (4, 2, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert [truth[i] for i in batch["image_id"]] == list(zip(batch["caption"], batch["label"]))
        assert not torch.equal(batch["image"][:, 0], batch["image"][:, 1])  # two different pictures
    seen = {}
    for batch in build_eval_loader([data], batch_size=5, image_res=32):
        assert batch["image"].shape[1:] == (2, 3, 32, 32)
        for i, caps, labs in zip(batch["image_id"], batch["captions"], batch["labels"], strict=True):
            seen[i] = (caps[0], labs[0])
    assert seen == truth and len(seen) == 12


def test_batched_logits_equal_the_model_forward() -> None:
    torch.manual_seed(0)
    model = tiny_nlvr()
    pairs = torch.randn(3, 2, 3, 32, 32)
    index = torch.tensor([0, 2, 2, 1])
    ids, mask = tokenize(build_tokenizer(), ["the left image is red", "no", "both images are blue", "x"], 30)
    official_order = torch.cat([pairs[index, 0], pairs[index, 1]])  # [2N]: the N left images, then the N right
    expected = model.logits(official_order, ids, mask)
    torch.testing.assert_close(nlvr_logits(model, pairs, index, ids, mask), expected, rtol=0, atol=ATOL)


def test_evaluation_matches_a_per_sentence_reference(nlvr_split) -> None:
    data, _ = nlvr_split
    torch.manual_seed(1)
    model = tiny_nlvr()
    tok = build_tokenizer()
    cfg = NLVREvalConfig(image_batch_size=5, pairs_per_batch=3, num_workers=0)
    result = evaluate_nlvr_model(model, data, cfg, torch.device("cpu"), tokenizer=tok)
    preds, targets = [], []
    for batch in build_eval_loader([data], batch_size=1, image_res=32):
        ids, mask = tokenize(tok, batch["captions"][0], cfg.max_tokens)
        image = batch["image"][0]  # [2, 3, R, R]: left, right
        preds.append(int(model.logits(image, ids, mask).argmax()))
        targets.append(int(batch["labels"][0][0] == "True"))
    assert result["num_pairs"] == result["num_images"] == 12 and result["labels"] == ["False", "True"]
    assert result["accuracy"] == pytest.approx(classification_accuracy(preds, targets))
    assert torch.tensor(result["confusion"]).sum(1).tolist() == [6, 6]  # one true, one false sentence per pair


def _fixture(heads_dir: Path) -> tuple[ALBEFConfig, dict, dict]:
    folder = heads_dir / "nlvr"
    meta = json.loads((folder / "nlvr_meta.json").read_text())
    bert = json.loads((folder / "nlvr_bert_config.json").read_text())
    backbone = config_from_official(meta["albef_config"], bert, meta["size_shims"].get("vit_overrides"))
    state = torch.load(folder / "nlvr_state.pth", weights_only=True)
    return backbone, state, torch.load(folder / "nlvr_outputs.pt", weights_only=True)


@torch.no_grad()
def test_official_nlvr_checkpoint_through_the_stage_path(heads_dir: Path, tmp_path: Path) -> None:
    """An official fine-tuned NLVR checkpoint ({'model': state_dict}, official key names) read as a file by
    the stages' reader, loaded with its key report, scored by the evaluation's batched logits: the
    official logits and predictions (fixture of models/model_nlvr.py) to 1e-5."""
    backbone, state, o = _fixture(heads_dir)
    torch.save({"model": state, "epoch": 9}, tmp_path / "checkpoint_best.pth")
    loaded = read_checkpoint(tmp_path / "checkpoint_best.pth")
    model, report = build_nlvr_from_checkpoint(loaded.state_dict, backbone, distill=True)
    assert report.missing == [] and report.unexpected == [], report.summary()
    assert set(report.skipped) == {"text_encoder.embeddings.position_ids", "text_encoder_m.embeddings.position_ids"}
    model.eval()
    i = o["inputs"]
    pairs = torch.stack([i["image0"], i["image1"]], dim=1)  # the loader's [B, 2, 3, R, R]
    b = pairs.shape[0]
    logits = nlvr_logits(model, pairs, torch.arange(b), o["input_ids"], o["attention_mask"])
    assert (logits.double() - o["logits"].double()).abs().max().item() <= ATOL
    assert torch.equal(logits.argmax(1), o["logits"].argmax(1))
    assert (model.logits_m(torch.cat([i["image0"], i["image1"]]), o["input_ids"], o["attention_mask"]) - o["logits_m"]).abs().max() <= ATOL  # fmt: skip
    # Without distillation (the evaluation stage) the teacher is left out and the student is the same.
    student, report = build_nlvr_from_checkpoint(loaded.state_dict, backbone, distill=False)
    assert report.missing == [] and not any(k.split(".")[0].endswith("_m") for k in report.unexpected)
    assert (nlvr_logits(student.eval(), pairs, torch.arange(b), o["input_ids"], o["attention_mask"]) - logits).abs().max() == 0  # fmt: skip


def test_checkpoint_kinds() -> None:
    """Pretraining -> TA (fusion layers duplicated) -> NLVR (TA weights, teacher copied or, as NLVR.py,
    left at its init); a pretraining checkpoint also goes straight to NLVR through the TA import; an NLVR
    checkpoint cannot start TA; a checkpoint without encoders is refused."""
    backbone = tiny_backbone()
    torch.manual_seed(0)
    pretrained = build_albef(backbone).state_dict()
    ta, report = build_ta_from_checkpoint(pretrained, backbone, sim_temp=5.0)
    assert report.missing == ["ta_head.bias", "ta_head.weight"] and ta.config.sim_temp == 5.0
    f = backbone.text.fusion_layer
    src = pretrained[f"text_encoder.encoder.layer.{f}.crossattention.self.query.weight"]
    for layer in (f, f + 1):  # Pretrain_nlvr.py: fusion layer f -> layers f and f + 1
        assert torch.equal(ta.text_encoder.encoder.layer[layer].crossattention.self.query.weight, src)
    ta_sd = ta.state_dict()
    for teacher in (True, False):
        torch.manual_seed(1)
        model, report = build_nlvr_from_checkpoint(ta_sd, backbone, distill=True, teacher_from_checkpoint=teacher)
        assert sorted({k.split(".")[0] for k in report.missing}) == ["cls_head", "cls_head_m", "text_encoder_m", "visual_encoder_m"]  # fmt: skip
        copied = torch.equal(model.text_encoder_m.encoder.layer[0].attention.self.query.weight,
                             ta_sd["text_encoder.encoder.layer.0.attention.self.query.weight"])  # fmt: skip
        assert copied == teacher
    direct, _ = build_nlvr_from_checkpoint(pretrained, backbone, distill=False)
    from_ta, _ = build_nlvr_from_checkpoint(ta_sd, backbone, distill=False)
    for key, value in from_ta.state_dict().items():
        if not key.startswith("cls_head"):
            assert torch.equal(direct.state_dict()[key], value), key
    with pytest.raises(ValueError, match="NLVR2 classifier"):
        build_ta_from_checkpoint(direct.state_dict(), backbone)
    with pytest.raises(ValueError, match="encoder weights"):
        build_nlvr_from_checkpoint({"cls_head.0.weight": torch.zeros(64, 64)}, backbone, distill=False)
    assert isinstance(build_text_assignment(TAConfig(backbone=backbone)), torch.nn.Module)


def test_configs() -> None:
    cfg = load_config(NLVRConfig, "nlvr")
    assert (cfg.model.image_res, cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr) == (384, 16, 10, 2e-5)
    assert (cfg.optim.min_lr, cfg.optim.warmup_lr, cfg.train.alpha, cfg.train.alpha_ramp_epochs) == (1e-6, 1e-5, 0.4, 1)
    assert cfg.model.distill and cfg.model.teacher_from_checkpoint
    tiny = load_config(NLVRConfig, "nlvr_tiny_cpu", {"data.train": "[/x]"})
    assert NLVRTask(tiny, "unused").queue_size() is None
    ta = load_config(PretrainConfig, "nlvr_ta")
    assert (ta.task, ta.model.init, ta.model.image_res, ta.train.batch_size, ta.train.epochs) == (
        "text_assignment", "checkpoint", 256, 64, 1
    )  # fmt: skip
    assert (ta.optim.lr, ta.optim.warmup_lr, ta.optim.min_lr, ta.model.ta_sim_temp) == (2e-5, 1e-5, 1e-5, 0.07)
    assert load_config(PretrainConfig, "pretrain_4m").task == "albef"
