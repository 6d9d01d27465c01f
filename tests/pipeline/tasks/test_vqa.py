"""VQA pipeline pieces: an official fine-tuned VQA checkpoint through the stage's loading and ranking code
(parity with the official-code fixture), the batched evaluation against per-question ranking, the
training answers of a batch, our pretraining checkpoint through VQA.py's key loop, the result JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_prep.synthetic_vqa import write_synthetic_vqa
from model import config_from_official
from model.albef import build_albef
from model.config import ALBEFConfig
from pipeline.data.text import build_tokenizer, pre_caption
from pipeline.runtime.io import read_checkpoint
from pipeline.tasks.metrics import vqa_accuracy
from pipeline.tasks.vqa import (
    VQAEvalConfig,
    build_vqa_from_checkpoint,
    evaluate_vqa_model,
    rank_questions,
    result_entry,
    tokenize_answers,
    tokenize_questions,
    training_answers,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@torch.no_grad()
def test_official_vqa_checkpoint_reproduces_the_official_answers(heads_dir: Path, tmp_path: Path, tokenizer) -> None:
    """The fixture's official VQA model saved as VQA.py saves it ({'model': state_dict}, official keys), read
    and built by the stage's code, tokenised by ours (official mode) and ranked by `rank_questions`: the
    official top-k answer ids and `VQA.evaluation()` result JSON, exactly."""
    folder = heads_dir / "vqa"
    meta = json.loads((folder / "vqa_meta.json").read_text())
    bert = json.loads((folder / "vqa_bert_config.json").read_text())
    outputs = torch.load(folder / "vqa_outputs.pt", weights_only=True)
    inputs, ref = outputs["inputs"], outputs["rank_answer"]
    path = tmp_path / "checkpoint_07.pth"
    torch.save({"model": torch.load(folder / "vqa_state.pth", weights_only=True), "epoch": 7}, path)

    backbone = config_from_official(meta["albef_config"], bert, meta["size_shims"].get("vit_overrides"))
    loaded = read_checkpoint(path)
    model, report = build_vqa_from_checkpoint(loaded.state_dict, backbone, distill=False, first_token_twice=True)
    assert report.missing == [] and report.unexpected == [], report.summary()
    model.eval()

    cfg = VQAEvalConfig(question_sep=False, k_test=int(inputs["k_test"]))
    questions = [pre_caption(a["question"], cfg.max_words) for a in inputs["test_ann"]]
    assert questions == inputs["test_questions"]  # our cleaning = the official pre_question here
    q_ids, q_mask = tokenize_questions(tokenizer, questions, cfg.max_tokens, cfg.question_sep)
    assert torch.equal(q_ids, ref["question_input_ids"]) and torch.equal(q_mask, ref["question_attention_mask"])
    a_ids, a_mask = tokenize_answers(tokenizer, inputs["answer_list"], cfg.max_answer_tokens)
    assert torch.equal(a_ids, ref["answer_list_input_ids"]) and torch.equal(a_mask, ref["answer_list_attention_mask"])

    images = inputs["test_image"]
    ranking = rank_questions(model, images, torch.arange(len(questions)), q_ids, q_mask, a_ids, a_mask, cfg.k_test)
    assert torch.equal(ranking.first_topk_ids, ref["first_topk_ids"])
    assert torch.equal(ranking.topk_ids, ref["topk_ids"])
    result = [
        result_entry(str(int(q)), inputs["answer_list"][int(i)])
        for q, i in zip(inputs["test_question_ids"], ranking.topk_ids[:, 0])
    ]
    assert result == outputs["evaluation_result"]


def _write_vqa_split(root: Path, synth, split: str, per_shard: int = 3) -> Path:
    """An `albef prep vqa`-layout folder (shards + manifest) written directly from the synthetic files."""
    questions = json.loads(synth.questions[split].read_text())["questions"]
    grouped: dict[int, list[tuple[dict, list[str]]]] = {}
    for q, humans in zip(questions, synth.answers[split]):
        grouped.setdefault(q["image_id"], []).append((q, humans))
    (root / "shards").mkdir(parents=True)
    items, entries = sorted(grouped.items()), []
    for s in range(0, len(items), per_shard):
        name = f"shards/{s // per_shard:05d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for k, (image_id, qs) in enumerate(items[s : s + per_shard]):
                labels = [{"question_id": str(q["question_id"]), "answers": sorted(set(h)), "weights": [1.0] * len(set(h)), "human_answers": h} for q, h in qs]  # fmt: skip
                meta = {"captions": [q["question"] for q, _ in qs], "labels": labels, "image_id": str(image_id)}
                image = synth.image_root / f"COCO_{split}2014_{image_id:012d}.jpg"
                sink.write({"__key__": f"{s:05d}{k:04d}", "jpg": image.read_bytes(), "txt": b"q", "json": json.dumps(meta).encode()})  # fmt: skip
        entries.append({"path": name, "samples": len(items[s : s + per_shard])})
    manifest = {"format_version": 1, "source": "vqa", "split": split, "shards": entries,
                "num_samples": len(items), "num_captions": len(questions)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@torch.no_grad()
def test_batched_evaluation_matches_per_question_ranking(tmp_path: Path, tokenizer) -> None:
    synth = write_synthetic_vqa(tmp_path / "raw", splits={"val": 7}, image_size=32, per_image=3)
    data = _write_vqa_split(tmp_path / "val", synth, "val")
    torch.manual_seed(1)
    backbone = ALBEFConfig.tiny(image_size=32, embed_dim=32, queue_size=64)
    model, _ = build_vqa_from_checkpoint(build_albef(backbone).state_dict(), backbone, distill=False)
    model.eval()
    answer_list = ["yes", "no", "1", "2", "red", "blue", "green", "circle", "square", "dark red"]
    cfg = VQAEvalConfig(k_test=4, image_batch_size=3, questions_per_batch=4, num_workers=0)
    result = evaluate_vqa_model(model, data, answer_list, cfg, torch.device("cpu"), tokenizer=tokenizer)
    assert result["num_questions"] == result["num_scored"] == 21 and result["num_images"] == 7

    # Reference: one question at a time through the model's own rank_answers on its image.
    from pipeline.data import build_eval_loader

    a_ids, a_mask = tokenize_answers(tokenizer, answer_list, cfg.max_answer_tokens)
    expected, humans = {}, {}
    for batch in build_eval_loader([data], batch_size=1, image_res=32):
        for question, label in zip(batch["captions"][0], batch["labels"][0]):
            q_ids, q_mask = tokenize_questions(tokenizer, [question], cfg.max_tokens, True)
            ranking = model.rank_answers(batch["image"], q_ids, q_mask, a_ids, a_mask, cfg.k_test)
            expected[int(label["question_id"])] = answer_list[int(ranking.topk_ids[0, 0])]
            humans[int(label["question_id"])] = label["human_answers"]
    assert result["results"] == [{"question_id": q, "answer": expected[q]} for q in sorted(expected)]
    ids = sorted(expected)
    assert result["accuracy"] == pytest.approx(vqa_accuracy([expected[q] for q in ids], [humans[q] for q in ids]))
    assert result["majority_accuracy"] == pytest.approx(
        vqa_accuracy([result["majority_answer"]] * len(ids), [humans[q] for q in ids])
    )


def test_training_answers_flatten_a_batch() -> None:
    labels = [
        {"question_id": "1", "answers": ["running", "playing"], "weights": [0.7, 0.3], "human_answers": []},
        {"question_id": "2", "answers": ["2"], "weights": [0.5], "human_answers": []},
    ]
    answers, weights, per_question = training_answers(labels)
    assert answers == ["running", "playing", "2"] and per_question.tolist() == [2, 1]
    assert weights.dtype == torch.float32 and weights.tolist() == pytest.approx([0.7, 0.3, 0.5])
    with pytest.raises(ValueError, match="no answers"):
        training_answers([{"question_id": "3", "answers": [], "weights": [], "human_answers": []}])


def test_our_pretraining_checkpoint_builds_the_decoder_from_the_fusion_layers() -> None:
    torch.manual_seed(0)
    backbone = ALBEFConfig.tiny(image_size=32, embed_dim=32, queue_size=64)
    pretrained = build_albef(backbone).state_dict()
    model, report = build_vqa_from_checkpoint(pretrained, backbone, distill=True)
    assert report.missing == [] and report.layout.startswith("official pretrain")
    fusion = backbone.text.fusion_layer
    sd = model.state_dict()
    for i in range(model.config.num_decoder_layers):
        for ours, src in (("text_decoder", "text_encoder"), ("text_decoder_m", "text_encoder_m")):
            name = "crossattention.self.query.weight"
            assert torch.equal(
                sd[f"{ours}.encoder.layer.{i}.{name}"], pretrained[f"{src}.encoder.layer.{fusion + i}.{name}"]
            )
    assert torch.equal(
        sd["text_decoder.embeddings.word_embeddings.weight"],
        pretrained["text_encoder.embeddings.word_embeddings.weight"],
    )


def test_result_entries_have_integer_ids_for_the_test_server() -> None:
    assert result_entry("262148000", "yes") == {"question_id": 262148000, "answer": "yes"}
    assert result_entry("img7#3", "2") == {"question_id": "img7#3", "answer": "2"}
    assert json.dumps([result_entry("5", "no")]) == '[{"question_id": 5, "answer": "no"}]'


def test_stage_configs_load_with_the_official_values() -> None:
    from pipeline.config import load_config
    from pipeline.stages.finetune_vqa import VQAConfig

    cfg = load_config(VQAConfig, "vqa", {})
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.alpha, cfg.train.alpha_ramp_epochs) == (32, 8, 0.4, 1.0)
    assert (cfg.optim.lr, cfg.optim.warmup_lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (2e-5, 1e-5, 1e-6, 0.02)
    assert cfg.model.image_res == 384 and cfg.model.distill and cfg.eval.k_test == 128 and cfg.data.max_tokens == 25
    assert len(cfg.data.train) == 3 and cfg.data.val is None  # train + val + VG, as the paper
    tiny = load_config(VQAConfig, "vqa_tiny_cpu", {"data.train": "[/x]"})
    assert tiny.model.preset == "tiny" and tiny.train.device == "cpu"
