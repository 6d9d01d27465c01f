"""`albef prep refcoco+`: the official ALBEF grounding json (or REFER refs(unc).p) + instances.json +
dets.json, COCO images served on 127.0.0.1, through real img2dataset.

Evaluation samples carry per expression the ref id, split, GT box, proposals and original size; boxes
stay in the original image's pixels and still land on the named shape after img2dataset's resize and
after the evaluation loader's square resize brought back to the original frame."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_prep.errors import PrepInputError, PrepOptionsError
from data_prep.http_server import FolderServer
from data_prep.options import parse_options
from data_prep.prep import prepare
from data_prep.sources import READERS
from data_prep.synthetic import COLORS
from data_prep.synthetic_grounding import SyntheticGrounding, write_synthetic_grounding
from pipeline.data import build_eval_loader

from prep_testutils import read_samples

RUN = {"image_size": 48, "processes": 1, "threads": 2, "samples_per_shard": 3, "retries": 0}


def _colour_at(image: torch.Tensor, x: float, y: float) -> tuple[int, ...]:
    """RGB of a uint8 [3, H, W] image at (x, y)."""
    return tuple(int(v) for v in image[:, int(y), int(x)])


def _close(rgb: tuple[int, ...], colour: str, tol: int = 45) -> bool:
    return max(abs(a - b) for a, b in zip(rgb, COLORS[colour])) <= tol


def _named_colour(text: str) -> str:
    return next(c for c in COLORS if c in text.split())


def _eval_files(tmp_path: Path) -> tuple[SyntheticGrounding, dict[str, str]]:
    synth = write_synthetic_grounding(tmp_path / "raw", splits={"val": 3, "testA": 2, "testB": 2}, seed=1, scale=2.0)
    files = {k: str(v) for k, v in synth.files.items() if k in ("refs", "instances", "dets")}
    return synth, files


@pytest.mark.slow
def test_prep_refcoco_eval_for_real(tmp_path: Path) -> None:
    synth, files = _eval_files(tmp_path)
    test = json.loads(synth.files["test_json"].read_text())
    dets = json.loads(Path(files["dets"]).read_text())
    no_dets = test[-1]["image"]  # the last image loses its proposals
    del dets[str(int(Path(no_dets).stem.rsplit("_", 1)[1]))]
    Path(files["dets"]).write_text(json.dumps(dets))
    gone = test[0]["image"]  # the first image answers 404
    records = test + [{"image": test[1]["image"], "text": "  ", "ref_id": test[1]["ref_id"]},
                      {"image": test[1]["image"], "text": "a ghost", "ref_id": 99999}]  # fmt: skip
    path = tmp_path / "refcoco+_test.json"
    path.write_text(json.dumps(records))
    with FolderServer(synth.image_root, not_found=[f"/{gone}"]) as server:
        manifest = prepare("refcoco+", path, tmp_path / "out", image_root=server.base_url, split="test", **files, **RUN)
    n_no_dets = sum(r["image"] == no_dets for r in test)
    assert manifest["skipped"] == {"empty_caption": 1, "no_proposals": n_no_dets, "unknown_ref": 1}
    assert manifest["input_rows"] == len(records) and sum(manifest["failures"].values()) == 1
    kept = [r for r in test if r["image"] not in (gone, no_dets)]
    samples = read_samples(tmp_path / "out")
    assert manifest["num_captions"] == len(kept) == sum(len(s.meta["captions"]) for s in samples)
    for s in samples:
        assert len(s.meta["labels"]) == len(s.meta["captions"])
        for label in s.meta["labels"]:
            assert label["box"] == synth.boxes[label["ref_id"]] and label["split"] in ("testA", "testB")
            assert label["box"] in label["proposals"]
            height, width = label["image_hw"]
            assert (s.meta["original_height"], s.meta["original_width"]) == (height, width)
            assert abs(s.image_size[0] / s.image_size[1] - width / height) < 0.05  # keep_ratio: whole image
    # The evaluation loader squeezes each image to 64 x 64; brought back to the original frame (as the
    # Grad-CAM map is), the box of every expression lies on the shape it names.
    loader = build_eval_loader([tmp_path / "out"], batch_size=4, image_res=64, normalize=False)
    checked = 0
    for batch in loader:
        for image, caps, labels in zip(batch["image"], batch["captions"], batch["labels"]):
            height, width = labels[0]["image_hw"]
            original = F.interpolate(image[None].float(), size=(height, width), mode="bilinear")[0].round().byte()
            for text, label in zip(caps, labels):
                x, y, w, h = label["box"]
                assert _close(_colour_at(original, x + w / 2, y + h / 2), _named_colour(text)), (text, label)
                checked += 1
    assert checked == len(kept)


@pytest.mark.slow
def test_prep_refcoco_native_refs_and_train(tmp_path: Path) -> None:
    synth = write_synthetic_grounding(tmp_path / "raw", splits={"train": 3, "val": 2}, seed=2, texts_per_ref=2)
    files = {k: str(v) for k, v in synth.files.items() if k in ("instances", "dets")}
    with FolderServer(synth.image_root) as server:
        native = prepare("refcoco+", synth.files["refs"], tmp_path / "native", image_root=server.base_url,
                         split="val", **files, **RUN)  # fmt: skip
        train = prepare("refcoco+", synth.files["train_json"], tmp_path / "train", image_root=server.base_url,
                        split="train", **RUN)  # fmt: skip
    val = json.loads(synth.files["val_json"].read_text())
    got = sorted((t, lab["ref_id"]) for s in read_samples(tmp_path / "native") for t, lab in zip(s.meta["captions"], s.meta["labels"]))  # fmt: skip
    assert got == sorted((r["text"], r["ref_id"]) for r in val) and native["num_samples"] == 2
    samples = read_samples(tmp_path / "train")
    assert train["num_samples"] == 3 and train["num_captions"] == 3 * 3 * 2  # 3 shapes x 2 expressions
    assert all("labels" not in s.meta and len(s.meta["captions"]) == 6 for s in samples)


def test_refcoco_option_and_input_errors(tmp_path: Path) -> None:
    synth, files = _eval_files(tmp_path)
    read = READERS["refcoco+"]
    with pytest.raises(PrepOptionsError, match="resize_mode"):
        read(synth.files["val_json"], parse_options("refcoco+", {"image_root": str(synth.image_root), "split": "val", "resize_mode": "center_crop", **files}))  # fmt: skip
    with pytest.raises(PrepOptionsError, match="--dets"):
        opts = {"image_root": str(synth.image_root), "split": "test", "refs": files["refs"], "instances": files["instances"]}  # fmt: skip
        read(synth.files["test_json"], parse_options("refcoco+", opts))
    with pytest.raises(PrepOptionsError, match="split"):
        parse_options("refcoco+", {"image_root": str(synth.image_root)})
    with pytest.raises(PrepOptionsError, match="--regions"):
        parse_options("refcoco+", {"image_root": "x", "split": "val", "regions": "r.json"})

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([{"ref_id": 1, "x": Evil()}]))
    with pytest.raises(PrepInputError, match="only plain data"):
        read(synth.files["val_json"], parse_options("refcoco+", {"image_root": str(synth.image_root), "split": "val", **files, "refs": str(evil)}))  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "train2014/x.jpg", "text": "the red circle", "ref_id": "r1"}]))
    with pytest.raises(PrepInputError, match="entry 0.*ref_id"):
        read(bad, parse_options("refcoco+", {"image_root": str(synth.image_root), "split": "val", **files}))
    rows = read(synth.files["val_json"], parse_options("refcoco+", {"image_root": str(synth.image_root), "split": "val", **files}))  # fmt: skip
    assert len(rows.rows) == 3 and rows.input_rows == 9 and not rows.skipped
    label = rows.rows[0].extra["labels"][0]  # type: ignore[index]
    assert set(label) == {"ref_id", "split", "box", "proposals", "image_hw"} and label["split"] == "val"
