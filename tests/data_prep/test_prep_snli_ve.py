"""`albef prep snli_ve`: SNLI-VE jsonl (or ALBEF's ve json) + local Flickr30k images -> shards, for real.

One sample per image with its hypotheses as `captions` and their gold labels as `labels` (aligned);
bad records are skipped and counted; img2dataset runs for real on file:// URLs built from
--image_root; the rerun resumes without downloading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_prep.errors import PrepInputError
from data_prep.options import parse_options
from data_prep.prep import prepare
from data_prep.sources import READERS
from data_prep.synthetic_ve import write_synthetic_ve

from prep_testutils import DECODE_ERROR, IMAGE_SIZE, read_samples

RUN_OPTIONS = {"image_size": IMAGE_SIZE, "processes": 1, "threads": 2, "samples_per_shard": 2, "retries": 0}


def _line(image_id: object, hypothesis: str, label: str) -> str:
    return json.dumps(
        {"Flickr30K_ID": image_id, "sentence1": "a premise", "sentence2": hypothesis, "gold_label": label}
    )


def _write_input(tmp_path: Path) -> tuple[Path, Path, dict[str, list[tuple[str, str]]]]:
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (48 + 8 * i, 40), (50 * i, 100, 200)).save(images / f"10{i}.jpg")
    (images / "666.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "secret.jpg").write_bytes(b"private")
    lines = [
        _line("100", "A dog runs.", "entailment"),  # 1
        _line(101, "nobody is outside", "contradiction"),  # 2: an int id
        _line("100", "the dog is old", "neutral"),  # 3: second hypothesis of image 100
        _line("102", "two people", "-"),  # 4: no gold label
        _line("102", "  ", "neutral"),  # 5: empty hypothesis
        _line("102", "a cat sleeps", "contradiction"),  # 6
        _line("666", "broken file", "entailment"),  # 7: fails to decode
        _line("777", "no such file", "neutral"),  # 8: 404 (missing file)
        _line("../secret", "escapes the root", "entailment"),  # 9
        _line("100", "a dog in the grass", "entailment"),  # 10
    ]
    path = tmp_path / "snli_ve_train.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"Flickr30K_ID": "101", "sentence2": "caf\xe9"}\n')
    expected = {
        "100": [("A dog runs.", "entailment"), ("the dog is old", "neutral"), ("a dog in the grass", "entailment")],
        "101": [("nobody is outside", "contradiction")],
        "102": [("a cat sleeps", "contradiction")],
    }
    return path, images, expected


@pytest.mark.slow
def test_prep_snli_ve_for_real(tmp_path: Path) -> None:
    path, images, expected = _write_input(tmp_path)
    out = tmp_path / "out"
    manifest = prepare("snli_ve", path, out, image_root=str(images), split="train", **RUN_OPTIONS)
    samples = read_samples(out)
    got = {s.meta["image_id"]: list(zip(s.meta["captions"], s.meta["labels"])) for s in samples}
    assert got == expected
    assert all(s.txt == s.meta["captions"][0] and min(s.image_size) == IMAGE_SIZE for s in samples)
    assert manifest["num_samples"] == 3 and manifest["num_captions"] == 5
    assert manifest["skipped"] == {"bad_label": 1, "empty_caption": 1, "not_utf8": 1, "outside_image_root": 1}
    assert manifest["skipped_examples"]["bad_label"] == [f"{path}:4"]
    assert manifest["input_rows"] == 11 and manifest["split"] == "train" and manifest["complete"]
    assert sum(manifest["failures"].values()) == 2 and manifest["failures"].get(DECODE_ERROR) == 1
    # The rerun resumes: every shard is finished, nothing is downloaded, the manifest is the same.
    (out / "shards" / "00000.tar").touch()
    again = prepare("snli_ve", path, out, image_root=str(images), split="train", **RUN_OPTIONS)
    assert {k: v for k, v in again.items() if k not in ("elapsed_s", "created")} == {
        k: v for k, v in manifest.items() if k not in ("elapsed_s", "created")
    }


def test_reader_accepts_the_albef_json_and_refuses_malformed_records(tmp_path: Path) -> None:
    synth = write_synthetic_ve(tmp_path / "synth", splits={"dev": 4}, image_size=16)
    albef = [
        {"image": r["Flickr30K_ID"], "sentence": r["sentence2"], "label": r["gold_label"]}
        for r in map(json.loads, synth.jsonl["dev"].read_text().splitlines())
    ]
    (tmp_path / "ve_dev.json").write_text(json.dumps(albef))
    opts = parse_options("snli_ve", {"image_root": str(synth.image_root)})
    from_jsonl = READERS["snli_ve"](synth.jsonl["dev"], opts)
    from_json = READERS["snli_ve"](tmp_path / "ve_dev.json", opts)
    assert from_json.rows == from_jsonl.rows and len(from_json.rows) == 4
    assert from_json.input_rows == synth.pairs["dev"] == 12
    for row in from_json.rows:  # one hypothesis of each class per synthetic image
        assert sorted(row.extra["labels"]) == ["contradiction", "entailment", "neutral"]  # type: ignore[index]
        assert row.url == (synth.image_root.resolve() / f"{row.image_id}.jpg").as_uri()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line("1", "ok", "neutral") + "\n" + json.dumps({"Flickr30K_ID": "2", "gold_label": "neutral"}))
    with pytest.raises(PrepInputError, match=f"{bad}:2.*sentence2"):
        READERS["snli_ve"](bad, opts)
    with pytest.raises(Exception, match="--image_root"):
        parse_options("snli_ve", {})
