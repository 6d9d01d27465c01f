"""manifest.json building from img2dataset's per-shard files, and its atomic write."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.manifest import MAX_PIXELS_REASON, build_manifest, normalize_reason, read_manifest, write_json_atomic
from data_prep.records import SourceRows


def test_normalize_reason_groups_by_cause() -> None:
    assert normalize_reason("cannot identify image file <_io.BytesIO object at 0x7f3a2b>") == (
        "cannot identify image file <_io.BytesIO object>"
    )
    assert normalize_reason("unknown url type: '/data/a.jpg'") == "unknown url type: '…'"
    assert normalize_reason(None) == "unknown"
    cv2_refusal = ("OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:79: error: (-215:Assertion failed) "
                   "pixels <= CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'\n")  # fmt: skip
    assert normalize_reason(cv2_refusal) == MAX_PIXELS_REASON == "image larger than max_pixels"


def _fake_shard(shards: Path, shard_id: int, outcomes: list[tuple[str, str | None, list[str]]]) -> None:
    name = f"{shard_id:05d}"
    (shards / f"{name}.tar").write_bytes(b"")
    pq.write_table(pa.table({"status": [o[0] for o in outcomes], "error_message": [o[1] for o in outcomes],
                             "captions": [o[2] for o in outcomes]}), shards / f"{name}.parquet")  # fmt: skip
    successes = sum(o[0] == "success" for o in outcomes)
    (shards / f"{name}_stats.json").write_text(json.dumps({"count": len(outcomes), "successes": successes}))


def test_build_manifest_counts_and_missing_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _fake_shard(shards, 0, [("success", None, ["a", "b"]), ("failed_to_download", "HTTP Error 404: x", ["c"])])
    _fake_shard(shards, 2, [("success", None, ["d"]), ("failed_to_resize", "Image decoding error", ["e"])])
    rows = SourceRows(rows=[], input_rows=9, skipped={"empty_caption": 2}, skipped_examples={"empty_caption": ["f:3"]})
    m = build_manifest(tmp_path, shards, source="cc3m", split=None, rows=rows, expected_shards=3,
                       settings={"image_size": 32}, elapsed_s=1.23456)  # fmt: skip
    assert m["shards"] == [{"path": "shards/00000.tar", "samples": 1}, {"path": "shards/00002.tar", "samples": 1}]
    assert (m["num_samples"], m["num_captions"], m["successes"]) == (2, 3, 2)
    assert m["failures"] == {"HTTP Error 404: x": 1, "Image decoding error": 1}
    assert m["complete"] is False and m["missing_shards"] == [1]
    assert m["skipped"] == {"empty_caption": 2} and m["input_rows"] == 9 and m["elapsed_s"] == 1.235
    assert m["skipped_examples"] == {"empty_caption": ["f:3"]}


def test_write_json_atomic_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"format_version": 1, "x": "é"})
    write_json_atomic(path, {"format_version": 1, "x": "second"})
    assert read_manifest(path) == {"format_version": 1, "x": "second"}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    write_json_atomic(path, {"format_version": 99})
    with pytest.raises(ValueError, match="format_version 99"):
        read_manifest(path)
