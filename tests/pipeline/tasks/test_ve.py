"""SNLI-VE pipeline pieces: labels through the loaders, the batched evaluation against a per-pair
reference, checkpoint loading checks, the stage configs."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_prep.synthetic_ve import write_synthetic_ve
from model.config import ALBEFConfig
from model.heads.ve import VE_LABELS, ClassifierConfig, build_ve
from pipeline.config import load_config
from pipeline.data import build_eval_loader, build_train_loader
from pipeline.data.text import build_tokenizer, pre_caption, tokenize
from pipeline.stages.finetune_ve import VEConfig, VETask
from pipeline.tasks.metrics import classification_accuracy
from pipeline.tasks.ve import VEEvalConfig, build_ve_from_checkpoint, evaluate_ve_model, label_ids, ve_logits


def write_ve_split(root: Path, jsonl: Path, image_root: Path, per_shard: int = 4) -> Path:
    """An `albef prep snli_ve`-layout folder (shards + manifest) written directly from a synthetic jsonl."""
    grouped: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        grouped[r["Flickr30K_ID"]].append((r["sentence2"], r["gold_label"]))
    (root / "shards").mkdir(parents=True)
    items, entries = sorted(grouped.items()), []
    for s in range(0, len(items), per_shard):
        name = f"shards/{s // per_shard:05d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for k, (image_id, pairs) in enumerate(items[s : s + per_shard]):
                meta = {"captions": [h for h, _ in pairs], "labels": [lab for _, lab in pairs], "image_id": image_id}
                sink.write(
                    {
                        "__key__": f"{s // per_shard:05d}{k:04d}",
                        "jpg": (image_root / f"{image_id}.jpg").read_bytes(),
                        "txt": pairs[0][0].encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
        entries.append({"path": name, "samples": len(items[s : s + per_shard])})
    manifest = {"format_version": 1, "source": "snli_ve", "split": "test", "shards": entries,
                "num_samples": len(items), "num_captions": sum(len(p) for _, p in items)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def ve_split(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], str]]:
    """A 10-image split with 6 hypotheses each, and {(image_id, cleaned hypothesis): label}."""
    synth = write_synthetic_ve(tmp_path / "raw", splits={"test": 10}, image_size=32, per_label=2)
    truth = {}
    for line in synth.jsonl["test"].read_text().splitlines():
        r = json.loads(line)
        truth[(r["Flickr30K_ID"], pre_caption(r["sentence2"], 30))] = r["gold_label"]
    return write_ve_split(tmp_path / "test", synth.jsonl["test"], synth.image_root), truth


def tiny_ve(distill: bool = True) -> torch.nn.Module:
    backbone = ALBEFConfig.tiny(image_size=32)
    return build_ve(ClassifierConfig(backbone=backbone, num_classes=3, distill=distill)).eval()


def test_label_ids() -> None:
    assert label_ids(["contradiction", "neutral", "entailment", 2]).tolist() == [0, 1, 2, 2]
    for bad in ("-", 3, True, None):
        with pytest.raises(ValueError, match="not an SNLI-VE label"):
            label_ids([bad])


def test_loaders_carry_the_label_of_each_hypothesis(ve_split) -> None:
    data, truth = ve_split
    tok = build_tokenizer()
    train = build_train_loader(
        [data], batch_size=8, rank=0, world_size=1, num_workers=0, seed=3, start_step=0, image_res=32,
        tokenizer=tok, max_len=30, num_steps=6, shuffle_buffer=4,
    )  # fmt: skip
    seen = [
        ((i, c), lab)
        for batch in train
        for i, c, lab in zip(batch["image_id"], batch["caption"], batch["label"], strict=True)
    ]
    assert len(seen) == 48 and all(truth[key] == lab for key, lab in seen)
    assert len({key for key, _ in seen}) > 20  # the draw covers many hypotheses, not one per image
    pairs = [
        ((i, c), lab)
        for batch in build_eval_loader([data], batch_size=4, image_res=32)
        for i, caps, labs in zip(batch["image_id"], batch["captions"], batch["labels"], strict=True)
        for c, lab in zip(caps, labs, strict=True)
    ]
    assert len(pairs) == 60 and dict(pairs) == truth


def test_batched_logits_equal_the_model_forward() -> None:
    torch.manual_seed(0)
    model = tiny_ve()
    images = torch.randn(3, 3, 32, 32)
    index = torch.tensor([0, 0, 2, 1, 2])
    ids, mask = tokenize(build_tokenizer(), ["a red circle", "no", "the square is blue", "x", "drawn by eve"], 30)
    expected = model.logits(images[index], ids, mask)
    torch.testing.assert_close(ve_logits(model, images, index, ids, mask), expected, rtol=0, atol=1e-5)


def test_evaluation_matches_a_per_pair_reference(ve_split) -> None:
    data, truth = ve_split
    torch.manual_seed(1)
    model = tiny_ve(distill=False)
    tok = build_tokenizer()
    cfg = VEEvalConfig(image_batch_size=3, pairs_per_batch=5, num_workers=0)
    result = evaluate_ve_model(model, data, cfg, torch.device("cpu"), tokenizer=tok)
    preds, targets = [], []
    for batch in build_eval_loader([data], batch_size=1, image_res=32):
        for caption, label in zip(batch["captions"][0], batch["labels"][0]):
            ids, mask = tokenize(tok, [caption], cfg.max_tokens)
            preds.append(int(model.logits(batch["image"], ids, mask).argmax()))
            targets.append(VE_LABELS[label])
    assert result["num_pairs"] == 60 and result["num_images"] == 10
    assert result["accuracy"] == pytest.approx(classification_accuracy(preds, targets))
    confusion = torch.tensor(result["confusion"])
    assert confusion.sum() == 60 and confusion.sum(1).tolist() == [20, 20, 20]  # per_label=2 x 10 images
    assert set(result["per_class"]) == set(VE_LABELS)


def test_checkpoint_without_encoders_is_refused() -> None:
    with pytest.raises(ValueError, match="encoder weights"):
        build_ve_from_checkpoint({"cls_head.0.weight": torch.zeros(64, 64)}, ALBEFConfig.tiny(image_size=32), True)


def test_checkpoint_from_pretraining_loads_and_copies_the_teacher() -> None:
    from model.albef import build_albef

    backbone = ALBEFConfig.tiny(image_size=32, embed_dim=32, queue_size=64)
    pretrained = build_albef(backbone).state_dict()
    model, report = build_ve_from_checkpoint(pretrained, backbone, distill=True)
    assert all(k.startswith(("cls_head", "cls_head_m")) for k in report.missing), report.missing
    for key, value in model.state_dict().items():
        if key.startswith(("visual_encoder.", "text_encoder.")):
            torch.testing.assert_close(value, pretrained[key], rtol=0, atol=0)
    torch.testing.assert_close(model.cls_head_m[0].weight, model.cls_head[0].weight, rtol=0, atol=0)


def test_configs() -> None:
    cfg = load_config(VEConfig, "ve_snli")
    assert (cfg.model.image_res, cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr) == (384, 32, 5, 2e-5)
    assert (cfg.optim.min_lr, cfg.optim.warmup_lr, cfg.train.alpha, cfg.train.alpha_ramp_epochs) == (1e-6, 1e-5, 0.4, 0)
    tiny = load_config(VEConfig, "ve_tiny_cpu", {"data.train": "[/x]"})
    assert VETask(tiny, "unused").queue_size() is None
