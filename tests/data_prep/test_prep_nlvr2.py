"""`albef prep nlvr2`: NLVR2 json lines (or ALBEF's nlvr json) + local images -> pair shards, for real.

img2dataset downloads each distinct image once (file:// URLs from --image_root); the join writes one
sample per record carrying both images; a record whose image is missing or broken is skipped and
counted; bad records are skipped and counted; the rerun resumes without downloading or re-joining.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep.errors import PrepInputError
from data_prep.options import parse_options
from data_prep.prep import prepare
from data_prep.sources import READERS
from data_prep.sources.nlvr2 import image_names
from data_prep.synthetic_nlvr import write_synthetic_nlvr

from prep_testutils import DECODE_ERROR, IMAGE_SIZE

RUN_OPTIONS = {"image_size": IMAGE_SIZE, "processes": 1, "threads": 2, "samples_per_shard": 2, "retries": 0}


def read_pairs(out_dir: Path) -> list[dict]:
    """Every sample of the pair shards: {key, meta, left (w, h), right (w, h), left_bytes}."""
    samples = []
    for tar_path in sorted((out_dir / "pairs").glob("*.tar")):
        files: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key, parts in files.items():
            assert set(parts) == {"left.jpg", "right.jpg", "json"}, (tar_path, key, set(parts))
            sizes = {side: Image.open(io.BytesIO(parts[f"{side}.jpg"])).size for side in ("left", "right")}
            samples.append({"key": key, "meta": json.loads(parts["json"]), **sizes, "left_bytes": parts["left.jpg"]})
    return samples


def _line(identifier: str, sentence: str, label: str, **extra: object) -> str:
    return json.dumps({"identifier": identifier, "sentence": sentence, "label": label, "writer": "w1", **extra})


def _write_input(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "nlvr2_images"
    for name, colour in [("dev/dev-1-0-img0.png", 0), ("dev/dev-1-0-img1.png", 1), ("dev/dev-2-0-img0.png", 2),
                         ("dev/dev-2-0-img1.png", 3), ("train/7/train-5-1-img0.png", 4),
                         ("train/7/train-5-1-img1.png", 5)]:  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48 + 4 * colour, 40), (40 * colour, 100, 200)).save(root / name)
    (root / "dev/dev-3-0-img0.png").write_bytes(b"\x89PNG not a png")  # fails to decode
    lines = [
        _line("dev-1-0-0", "The left image shows two dogs.", "True"),  # 1
        _line("dev-1-0-1", "there are no dogs", "False"),  # 2: same pair, second sentence
        _line("dev-2-0-0", "one bird", "True"),  # 3
        _line("dev-2-0-1", "  ", "False"),  # 4: empty sentence
        _line("dev-2-0-2", "a cat", "maybe"),  # 5: bad label
        _line("dev-3-0-0", "broken left image", "True"),  # 6: left fails to decode
        _line("dev-4-0-0", "no such images", "False"),  # 7: both files missing
        _line("train-5-1-0", "train images live in numbered folders", "False", directory=7),  # 8
    ]
    path = tmp_path / "dev.json"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"identifier": "dev-1-0-3", "sentence": "caf\xe9"}\n')
    return path, root


def test_image_names_follow_the_release_layout() -> None:
    assert image_names("dev-850-0-1", None) == ("dev/dev-850-0-img0.png", "dev/dev-850-0-img1.png")
    assert image_names("train-10171-0-0", 42) == ("train/42/train-10171-0-img0.png", "train/42/train-10171-0-img1.png")
    with pytest.raises(ValueError, match="identifier"):
        image_names("dev-850-img0", None)


@pytest.mark.slow
def test_prep_nlvr2_for_real(tmp_path: Path) -> None:
    path, root = _write_input(tmp_path)
    out = tmp_path / "out"
    manifest = prepare("nlvr2", path, out, image_root=str(root), split="val", **RUN_OPTIONS)
    pairs = read_pairs(out)
    got = {p["meta"]["identifier"]: (p["meta"]["captions"], p["meta"]["labels"], p["meta"]["images"]) for p in pairs}
    assert got == {
        "dev-1-0-0": (["The left image shows two dogs."], ["True"], ["dev/dev-1-0-img0.png", "dev/dev-1-0-img1.png"]),
        "dev-1-0-1": (["there are no dogs"], ["False"], ["dev/dev-1-0-img0.png", "dev/dev-1-0-img1.png"]),
        "dev-2-0-0": (["one bird"], ["True"], ["dev/dev-2-0-img0.png", "dev/dev-2-0-img1.png"]),
        "train-5-1-0": (
            ["train images live in numbered folders"], ["False"],
            ["train/7/train-5-1-img0.png", "train/7/train-5-1-img1.png"],
        ),
    }  # fmt: skip
    # Both images of every sample, resized by img2dataset; left and right are the right files (widths differ).
    assert all(min(p["left"]) == IMAGE_SIZE and min(p["right"]) == IMAGE_SIZE for p in pairs)
    by_id = {p["meta"]["identifier"]: p for p in pairs}
    assert by_id["dev-1-0-0"]["left_bytes"] == by_id["dev-1-0-1"]["left_bytes"]  # one download, two samples
    assert by_id["dev-1-0-0"]["left"][0] < by_id["dev-1-0-0"]["right"][0]  # 48 px vs 52 px wide sources
    # One download per distinct image: 10 images named by the 7 usable records (dev-1's two shared), 6 fetched.
    assert manifest["images"]["download_rows"] == 10 and manifest["images"]["num_samples"] == 6
    assert manifest["failures"].get(DECODE_ERROR) == 1 and sum(manifest["failures"].values()) == 4
    assert manifest["num_samples"] == manifest["num_captions"] == 4 and manifest["sample_layout"] == "pair"
    assert manifest["skipped"] == {"bad_label": 1, "empty_caption": 1, "missing_image": 2, "not_utf8": 1}
    assert manifest["skipped_examples"]["missing_image"] == [f"{path}:6", f"{path}:7"]
    assert manifest["input_rows"] == 9 and manifest["split"] == "val" and manifest["complete"]
    assert [s["path"] for s in manifest["shards"]] == ["pairs/00000.tar", "pairs/00001.tar"]
    # The rerun resumes: nothing is downloaded nor joined again, the manifest is the same.
    stamp = (out / "pairs" / "00000.tar").stat().st_mtime_ns
    again = prepare("nlvr2", path, out, image_root=str(root), split="val", **RUN_OPTIONS)
    assert (out / "pairs" / "00000.tar").stat().st_mtime_ns == stamp
    assert {k: v for k, v in again.items() if k not in ("elapsed_s", "created")} == {
        k: v for k, v in manifest.items() if k not in ("elapsed_s", "created")
    }


def test_reader_accepts_the_albef_json_and_refuses_malformed_records(tmp_path: Path) -> None:
    synth = write_synthetic_nlvr(tmp_path / "synth", splits={"train": 4}, image_size=16, per_pair=2)
    records = [json.loads(line) for line in synth.jsonl["train"].read_text().splitlines()]
    albef = [
        {
            "images": list(image_names(r["identifier"], r.get("directory"))),
            "sentence": r["sentence"],
            "label": r["label"],
        }
        for r in records
    ]
    (tmp_path / "nlvr_train.json").write_text(json.dumps(albef))
    opts = parse_options("nlvr2", {"image_root": str(synth.image_root)})
    from_release = READERS["nlvr2"](synth.jsonl["train"], opts)
    from_albef = READERS["nlvr2"](tmp_path / "nlvr_train.json", opts)
    assert from_albef.rows == from_release.rows and len(from_albef.rows) == 8  # 4 pairs x 2 distinct images
    strip = [(p.left, p.right, p.sentence, p.label) for p in from_release.pairs]  # type: ignore[attr-defined]
    assert strip == [(p.left, p.right, p.sentence, p.label) for p in from_albef.pairs]  # type: ignore[attr-defined]
    assert from_albef.input_rows == synth.records["train"] == 16 and synth.true_records["train"] == 8
    for row in from_albef.rows:
        assert row.url == (synth.image_root.resolve() / row.image_id).as_uri() and row.image_id.startswith("train/")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line("dev-1-0-0", "ok", "True") + "\n" + json.dumps({"identifier": "dev-1-0-1", "label": "True"}))
    with pytest.raises(PrepInputError, match=f"{bad}:2.*sentence"):
        READERS["nlvr2"](bad, opts)
    escape = tmp_path / "escape.json"
    escape.write_text(json.dumps([{"images": ["../x.png", "a.png"], "sentence": "s", "label": "True"}]))
    assert READERS["nlvr2"](escape, opts).skipped == {"outside_image_root": 1}
    with pytest.raises(Exception, match="--image_root"):
        parse_options("nlvr2", {})
