"""Finished shards hold their samples in key order: one input list always gives the same shards."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from PIL import Image

from data_prep.http_server import FolderServer
from data_prep.prep import prepare
from data_prep.shard_order import SORTING_SUFFIX, sample_key, sort_shard, sort_shards

EXTS = (".jpg", ".json", ".txt")  # img2dataset's order inside one sample


def _write_tar(path: Path, names: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for name in names:
            data = f"payload of {name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_sample_key_is_the_name_up_to_its_first_dot() -> None:
    assert sample_key("000000042.jpg") == "000000042" and sample_key("a/000000042.ab.json") == "a/000000042"


def test_sort_shard_rewrites_once_and_keeps_every_byte(tmp_path: Path) -> None:
    keys = [f"{i:09d}" for i in range(12)]
    random.Random(0).shuffle(keys)
    shard = tmp_path / "00000.tar"
    _write_tar(shard, [k + ext for k in keys for ext in EXTS])

    assert sort_shard(shard) is True
    assert _names(shard) == [k + ext for k in sorted(keys) for ext in EXTS]
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            assert tar.extractfile(member).read() == f"payload of {member.name}".encode()
    assert not (tmp_path / f"00000.tar{SORTING_SUFFIX}").exists()

    before = shard.stat()
    assert sort_shard(shard) is False  # already in order: read, not written
    after = shard.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_sort_shards_touches_finished_shards_only_and_drops_interrupted_sorts(tmp_path: Path) -> None:
    names = [k + ext for k in ("000000002", "000000001") for ext in EXTS]
    for shard in ("00000", "00001"):
        _write_tar(tmp_path / f"{shard}.tar", names)
    (tmp_path / "00000_stats.json").write_text("{}")  # 00001 is still being downloaded
    (tmp_path / f"00000.tar{SORTING_SUFFIX}").write_bytes(b"cut short")

    assert sort_shards(tmp_path) == 1
    assert _names(tmp_path / "00000.tar") == sorted(names, key=lambda n: (sample_key(n), EXTS.index(n[9:])))
    assert _names(tmp_path / "00001.tar") == names
    assert not (tmp_path / f"00000.tar{SORTING_SUFFIX}").exists()


def test_two_preps_of_one_list_write_the_same_shards(tmp_path: Path) -> None:
    """8 download threads finish in varying order; the shards come out in key order every time."""
    media = tmp_path / "media"
    media.mkdir()
    n = 40
    for i in range(n):
        Image.new("RGB", (40 + i % 7, 40), (6 * i, 90, 250 - 6 * i)).save(media / f"p{i:02d}.jpg")
    options = {"image_size": 32, "processes": 1, "threads": 8, "samples_per_shard": 25, "retries": 0, "timeout": 10}
    shards = []
    with FolderServer(media) as srv:
        tsv = tmp_path / "cc3m.tsv"
        tsv.write_text("".join(f"picture number {i}\t{srv.url(f'p{i:02d}.jpg')}\n" for i in range(n)))
        for run in ("a", "b"):
            manifest = prepare("cc3m", tsv, tmp_path / run, **options)
            assert manifest["complete"] and manifest["num_samples"] == n
            shards.append([_names(tmp_path / run / s["path"]) for s in manifest["shards"]])
    assert shards[0] == shards[1]
    for names in shards[0]:
        keys = [sample_key(name) for name in names]
        assert keys == sorted(keys) and len(names) == 3 * len(set(keys))
