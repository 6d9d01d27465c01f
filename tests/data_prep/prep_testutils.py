"""Shared helpers of the data_prep tests: the served media folder and shard/manifest readers."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_SIZE = 32  # prep's --image_size in the tests: shorter side after keep_ratio resizing
NOT_FOUND_404 = "HTTP Error 404: File not found"
DECODE_ERROR = "Image decoding error"

# name -> what img2dataset must do with it. "gone.jpg" exists but the server answers 404 for it;
# "missing.jpg" does not exist at all.
MEDIA_OUTCOMES: dict[str, str] = {
    "good_00.jpg": "ok",
    "good_01.jpg": "ok",
    "good_02.jpg": "ok",
    "good_03.jpg": "ok",
    "huge.jpg": "ok",  # 4000x4000: must come out resized
    "not_image.jpg": DECODE_ERROR,  # text with a .jpg name
    "corrupt.jpg": DECODE_ERROR,  # JPEG start marker, then garbage
    "gone.jpg": NOT_FOUND_404,
    "missing.jpg": NOT_FOUND_404,
}
FORCED_404 = ["/gone.jpg"]


def make_media(folder: Path) -> Path:
    """Write the files of MEDIA_OUTCOMES (all but missing.jpg) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.new("RGB", (64 + 8 * i, 48), (60 * i, 200 - 40 * i, 90)).save(folder / f"good_0{i}.jpg", quality=90)
    Image.new("RGB", (4000, 4000), (10, 120, 240)).save(folder / "huge.jpg", quality=80)
    (folder / "not_image.jpg").write_text("this is not an image\n")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    Image.new("RGB", (40, 40)).save(folder / "gone.jpg")
    return folder


def write_png_bomb(path: Path, width: int, height: int) -> int:
    """A valid 8-bit greyscale PNG of width x height black pixels, compressed ~1000:1; returns its size.

    Rows are compressed one at a time, so writing it never holds the decoded image (30000x30000:
    ~875 KB on disk, 900 MB once decoded).
    """

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    deflate = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 (None), then the pixels
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # depth 8, colour type 0 (grey)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return len(data)


@dataclass
class Sample:
    key: str
    shard: str
    meta: dict[str, Any]
    txt: str
    image_size: tuple[int, int]


def read_samples(out_dir: Path) -> list[Sample]:
    """Every sample of every tar under out_dir/shards, decoding its jpg, txt and json."""
    samples = []
    for tar_path in sorted((out_dir / "shards").glob("*.tar")):
        files: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key, parts in files.items():
            assert set(parts) == {"jpg", "txt", "json"}, (tar_path, key, set(parts))
            size = Image.open(io.BytesIO(parts["jpg"])).size
            samples.append(Sample(key, tar_path.name, json.loads(parts["json"]), parts["txt"].decode(), size))
    return samples


def expected_failures(names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        outcome = MEDIA_OUTCOMES[name]
        if outcome != "ok":
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def check_output(
    out_dir: Path,
    manifest: dict[str, Any],
    *,
    expected: dict[str, list[str]],
    failures: dict[str, int],
    skipped: dict[str, int],
    input_rows: int,
    source: str,
) -> list[Sample]:
    """Assert the shards hold exactly `expected` (image_id -> captions) and the manifest agrees."""
    assert manifest == json.loads((out_dir / "manifest.json").read_text())
    samples = read_samples(out_dir)
    got = {s.meta["image_id"]: s.meta["captions"] for s in samples}
    assert len(got) == len(samples), "an image id occurs twice in the shards"
    assert got == expected
    for s in samples:
        assert s.txt == s.meta["captions"][0]
        assert s.meta["status"] == "success" and s.meta["key"] == s.key
        assert min(s.image_size) == IMAGE_SIZE, (s.meta["url"], s.image_size)
    per_shard: dict[str, int] = {}
    for s in samples:
        per_shard[s.shard] = per_shard.get(s.shard, 0) + 1
    for shard in manifest["shards"]:
        assert (out_dir / shard["path"]).is_file()
        assert shard["samples"] == per_shard.get(Path(shard["path"]).name, 0)
    assert manifest["format_version"] == 1 and manifest["source"] == source
    assert manifest["complete"] is True and manifest["missing_shards"] == []
    assert manifest["num_samples"] == manifest["successes"] == len(expected)
    assert manifest["num_captions"] == sum(len(c) for c in expected.values())
    assert manifest["failures"] == failures
    assert manifest["skipped"] == skipped
    assert manifest["input_rows"] == input_rows
    assert manifest["download_rows"] == len(expected) + sum(failures.values())
    assert not list((out_dir / "shards").glob("manifest*")), "our files must stay out of img2dataset's folder"
    return samples
