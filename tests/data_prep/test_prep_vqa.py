"""`albef prep vqa`: VQA v2 questions + annotations (or ALBEF's vqa/vg json) + images -> shards, for real.

One sample per image with its questions as `captions` and one label per question (question id, unique
answers, official weights, raw human answers); the test split carries no answers; the candidate
answer list is written beside the shards (official list copied, or the N most frequent answers);
img2dataset runs for real against generated images served on 127.0.0.1; the rerun resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.errors import PrepInputError, PrepOptionsError
from data_prep.http_server import FolderServer
from data_prep.options import parse_options
from data_prep.prep import prepare
from data_prep.sources import READERS
from data_prep.sources.vqa import answer_weights, build_answer_list
from data_prep.synthetic_vqa import write_synthetic_vqa

from prep_testutils import IMAGE_SIZE, NOT_FOUND_404, read_samples

RUN_OPTIONS = {"image_size": IMAGE_SIZE, "processes": 1, "threads": 2, "samples_per_shard": 2, "retries": 0}


def test_official_weights() -> None:
    answers = ["running"] * 7 + ["playing"] * 3
    unique, weights = answer_weights(answers, "vqa")
    assert unique == ["running", "playing"]
    assert weights == pytest.approx([0.7, 0.3], abs=1e-12)  # float64 sums of 1/10, as official
    assert answer_weights(["2"], "vg") == (["2"], [0.5])


@pytest.mark.slow
def test_prep_native_vqa_v2_served_over_http(tmp_path: Path) -> None:
    synth = write_synthetic_vqa(tmp_path / "raw", splits={"train": 4}, image_size=48, per_image=2)
    questions = json.loads(synth.questions["train"].read_text())
    annotations = json.loads(synth.annotations["train"].read_text())
    qs = questions["questions"]
    qs[1]["question"] = "   "  # empty question: skipped, its image keeps question 0
    annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] != qs[2]["question_id"]]
    qs.append({"image_id": 99, "question": "what color is it?", "question_id": 999})  # image 99 is missing (404)
    annotations["annotations"].append({"question_id": 999, "answers": [{"answer": "red"}] * 10})
    synth.questions["train"].write_text(json.dumps(questions))
    synth.annotations["train"].write_text(json.dumps(annotations))
    expected: dict[str, list[tuple[str, str, list[str]]]] = {}
    for k, (q, humans) in enumerate(zip(qs, synth.answers["train"])):
        if k not in (1, 2):
            expected.setdefault(str(q["image_id"]), []).append((str(q["question_id"]), q["question"], humans))
    out = tmp_path / "out"
    with FolderServer(synth.image_root) as server:
        args = dict(annotations=str(synth.annotations["train"]), num_answers=3, split="train", **RUN_OPTIONS)
        manifest = prepare("vqa", synth.questions["train"], out, image_root=server.base_url, **args)
        samples = read_samples(out)
        got = {
            s.meta["image_id"]: [
                (lab["question_id"], q, lab["human_answers"]) for q, lab in zip(s.meta["captions"], s.meta["labels"])
            ]
            for s in samples
        }
        assert got == {k: v for k, v in expected.items() if k != "99"}
        for s in samples:
            for lab in s.meta["labels"]:
                assert [lab["answers"], lab["weights"]] == list(map(list, answer_weights(lab["human_answers"], "vqa")))
        assert manifest["num_samples"] == 4 and manifest["num_captions"] == 6
        assert manifest["skipped"] == {"empty_caption": 1, "missing_annotation": 1}
        assert manifest["input_rows"] == 9 and manifest["failures"] == {NOT_FOUND_404: 1} and manifest["complete"]
        answer_list = json.loads((out / "answer_list.json").read_text())
        humans = [h for k in ("1", "2", "3", "4") for _, _, h in expected[k]] + [["red"] * 10]
        assert answer_list == build_answer_list_of(humans, 3) and len(answer_list) == 3
        # The rerun resumes: every shard is finished, nothing is downloaded, the manifest is the same.
        requests = server.request_count("/COCO_train2014_000000000001.jpg")
        again = prepare("vqa", synth.questions["train"], out, image_root=server.base_url, **args)
        assert server.request_count("/COCO_train2014_000000000001.jpg") == requests == 1
    assert {k: v for k, v in again.items() if k not in ("elapsed_s", "created")} == {
        k: v for k, v in manifest.items() if k not in ("elapsed_s", "created")
    }


def build_answer_list_of(humans: list[list[str]], n: int) -> list[str]:
    """The expected list by hand: human answers counted, most frequent first, ties alphabetical."""
    counts: dict[str, int] = {}
    for h in humans:
        for a in h:
            counts[a] = counts.get(a, 0) + 1
    return sorted(counts, key=lambda a: (-counts[a], a))[:n]


def _albef_entries(synth, split: str, with_answers: bool) -> list[dict]:
    questions = json.loads(synth.questions[split].read_text())["questions"]
    entries = []
    for q, humans in zip(questions, synth.answers[split]):
        entry = {
            "question_id": q["question_id"],
            "question": q["question"],
            "image": f"COCO_{split}2014_{q['image_id']:012d}.jpg",
            "dataset": "vqa",
        }
        if with_answers:
            entry["answer"] = humans
        entries.append(entry)
    return entries


@pytest.mark.slow
def test_prep_albef_test_json_without_answers_and_official_answer_list(tmp_path: Path) -> None:
    synth = write_synthetic_vqa(tmp_path / "raw", splits={"test": 3}, image_size=48, per_image=2, no_answers=("test",))
    assert "test" not in synth.annotations
    path = tmp_path / "vqa_test.json"
    path.write_text(json.dumps(_albef_entries(synth, "test", with_answers=False)))
    official = tmp_path / "answer_list.json"
    official.write_text(json.dumps(["yes", "no", "red"]))
    out = tmp_path / "out"
    manifest = prepare(
        "vqa", path, out, image_root=str(synth.image_root), answer_list=str(official), split="test", **RUN_OPTIONS
    )
    samples = read_samples(out)
    assert manifest["num_samples"] == 3 and manifest["num_captions"] == 6 and manifest["skipped"] == {}
    labels = [lab for s in samples for lab in s.meta["labels"]]
    assert sorted(int(lab["question_id"]) for lab in labels) == list(range(1, 7))
    assert all(lab["answers"] == lab["weights"] == lab["human_answers"] == [] for lab in labels)
    assert json.loads((out / "answer_list.json").read_text()) == ["yes", "no", "red"]


def test_albef_json_reader_vqa_and_vg(tmp_path: Path) -> None:
    synth = write_synthetic_vqa(tmp_path / "raw", splits={"val": 3}, image_size=16, per_image=2)
    entries = _albef_entries(synth, "val", with_answers=True)
    entries.append({"question": "what is it?", "image": entries[0]["image"], "answer": "a cat", "dataset": "vg"})
    entries.append({"question": "no answer?", "image": entries[0]["image"], "question_id": 77, "dataset": "vqa"})
    entries.append({"question": "odd", "image": entries[0]["image"], "answer": ["x"], "dataset": "gqa"})
    path = tmp_path / "vqa_val.json"
    path.write_text(json.dumps(entries))
    opts = parse_options("vqa", {"image_root": str(synth.image_root)})
    rows = READERS["vqa"](path, opts)
    assert rows.input_rows == 9 and len(rows.rows) == 3
    assert rows.skipped == {"bad_dataset": 1, "missing_answer": 1}
    assert rows.skipped_examples["missing_answer"] == [f"{path}: entry 7"]
    first = rows.rows[0]
    assert first.image_id == "COCO_val2014_000000000001" and first.url.endswith(entries[0]["image"])
    assert first.captions[-1] == "what is it?"
    vg = first.extra["labels"][-1]  # type: ignore[index]
    assert vg == {"question_id": "COCO_val2014_000000000001#6", "answers": ["a cat"], "weights": [0.5], "human_answers": ["a cat"]}  # fmt: skip
    # The native layout read through --annotations gives the same labels for the same questions.
    native = READERS["vqa"](
        synth.questions["val"],
        parse_options("vqa", {"image_root": str(synth.image_root), "annotations": str(synth.annotations["val"])}),
    )
    assert [r.extra["labels"] for r in native.rows] == [r.extra["labels"][:2] for r in rows.rows]  # type: ignore[index]
    assert build_answer_list(native, 100) == build_answer_list_of(synth.answers["val"], 100)


def test_malformed_inputs_and_options(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    opts = parse_options("vqa", {"image_root": str(root)})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q?", "image": "a.jpg", "answer": ["x"]}, {"question": "q?"}]))
    with pytest.raises(PrepInputError, match=r"entry 1.*image"):
        READERS["vqa"](bad, opts)
    native = tmp_path / "questions.json"
    native.write_text(json.dumps({"questions": [{"image_id": 1, "question": "q?", "question_id": 1}]}))
    with pytest.raises(PrepInputError, match="data_subtype"):
        READERS["vqa"](native, opts)
    with pytest.raises(PrepOptionsError, match="--image_root"):
        parse_options("vqa", {})
    with pytest.raises(PrepOptionsError, match="--annotations"):
        parse_options("coco", {"annotations": "x.json", "split": "train"})
    with pytest.raises(PrepOptionsError, match="--num_answers"):
        parse_options("vqa", {"image_root": str(root), "num_answers": 0})
