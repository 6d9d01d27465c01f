"""img2dataset for real, per source format: native file -> shards + manifest, asserted exactly.

Each case writes a tiny native list pointing at the served media (good JPEGs, a 4000x4000 one,
404s, a non-image, a corrupt JPEG) plus rows that must be skipped (file:// URLs to real local
images, names escaping --image_root, lines that are not UTF-8), runs `prepare`, and checks the
shards hold exactly the expected images with all their captions, and the manifest's counts. The
runs are independent child processes, so the module fixture runs two at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.http_server import FolderServer
from data_prep.prep import prepare
from data_prep.records import url_image_id

from prep_testutils import DECODE_ERROR, MEDIA_OUTCOMES, check_output, expected_failures

NAMES = list(MEDIA_OUTCOMES)
OK = [n for n in NAMES if MEDIA_OUTCOMES[n] == "ok"]
RUN_OPTIONS = {"image_size": 32, "processes": 1, "threads": 4, "samples_per_shard": 4, "retries": 0, "timeout": 5}


@dataclass
class Case:
    source: str
    input: Path
    expected: dict[str, list[str]]  # image_id -> captions
    failures: dict[str, int]
    skipped: dict[str, int]
    input_rows: int
    options: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, list[str]] | None = None  # skipped_examples of the manifest, when checked


def case_cc3m(tmp: Path, srv: FolderServer) -> Case:
    lines = [f"a caption for {n}\t{srv.url(n)}" for n in NAMES]  # lines 1-9
    lines += [f"  \t{srv.url('empty_caption.jpg')}", "an ftp image\tftp://example.org/x.jpg",
              "a bare path\t/data/x.jpg", f"same url again\t{srv.url(NAMES[0])}",
              f"my private photo\t{(srv.root / 'good_01.jpg').as_uri()}",  # a real, decodable local file
              "a secret\tfile:///etc/passwd"]  # fmt: skip
    path = tmp / "Train_GCC-training.tsv"
    bad = b"caf\xe9 au lait\t" + f"{srv.url('good_02.jpg')}?latin1\n".encode()  # line 16: a Latin-1 byte
    path.write_bytes(("\n".join(lines) + "\n").encode() + bad)
    expected = {url_image_id(srv.url(n)): [f"a caption for {n}"] for n in OK}
    skipped = {"empty_caption": 1, "bad_url_scheme": 4, "duplicate_url": 1, "not_utf8": 1}
    examples = {"bad_url_scheme": [f"{path}:{k}" for k in (11, 12, 14, 15)], "not_utf8": [f"{path}:16"],
                "empty_caption": [f"{path}:10"], "duplicate_url": [f"{path}:13"]}  # fmt: skip
    return Case("cc3m", path, expected, expected_failures(NAMES), skipped, len(lines) + 1, {"split": "train"}, examples)


def case_cc12m(tmp: Path, srv: FolderServer) -> Case:
    lines = ["url\tcaption"] + [f'{srv.url(n)}\t<PERSON> holds "{n}"' for n in NAMES]
    lines += [f"{srv.url(NAMES[1])}\tdup", f"{srv.url('x.jpg')}\t"]
    path = tmp / "cc12m.tsv"
    bad = f"{srv.url('good_03.jpg')}?x\t".encode() + b"\x93quoted\x94\n"  # cp1252 quotes on line 13
    path.write_bytes(("\n".join(lines) + "\n").encode() + bad)
    expected = {url_image_id(srv.url(n)): [f'<PERSON> holds "{n}"'] for n in OK}
    skipped = {"duplicate_url": 1, "empty_caption": 1, "not_utf8": 1}
    examples = {"duplicate_url": [f"{path}:11"], "empty_caption": [f"{path}:12"], "not_utf8": [f"{path}:13"]}
    return Case("cc12m", path, expected, expected_failures(NAMES), skipped, len(lines), examples=examples)


def case_sbu_json(tmp: Path, srv: FolderServer) -> Case:
    urls = [srv.url(n) for n in NAMES] + ["data:image/png;base64,AAAA"]
    captions = [f"sbu photo {n}" for n in NAMES] + ["inline"]
    path = tmp / "sbu-captions-all.json"
    path.write_text(json.dumps({"image_urls": urls, "captions": captions, "user_ids": ["u"] * len(urls)}))
    expected = {url_image_id(srv.url(n)): [f"sbu photo {n}"] for n in OK}
    return Case("sbu", path, expected, expected_failures(NAMES), {"bad_url_scheme": 1}, len(urls))


def case_sbu_txt(tmp: Path, srv: FolderServer) -> Case:
    path = tmp / "SBU_captioned_photo_dataset_urls.txt"
    path.write_text("".join(f"{srv.url(n)}\n" for n in NAMES) + f"{srv.url(NAMES[2])}\n")
    (tmp / "SBU_captioned_photo_dataset_captions.txt").write_text("".join(f"old sbu {n}\n" for n in NAMES) + "dup\n")
    expected = {url_image_id(srv.url(n)): [f"old sbu {n}"] for n in OK}
    return Case("sbu", path, expected, expected_failures(NAMES), {"duplicate_url": 1}, len(NAMES) + 1)


def _karpathy_sentences(name: str, k: int) -> list[dict[str, Any]]:
    return [{"raw": f"{name} sentence {j}.", "tokens": [name, "sentence", str(j)]} for j in range(k)]


def case_coco(tmp: Path, srv: FolderServer) -> Case:
    images, expected = [], {}
    for i, name in enumerate(NAMES):
        split = ("train", "restval")[i % 2]
        images.append({"filepath": ("train2014", "val2014")[i % 2], "filename": name, "split": split,
                       "cocoid": 1000 + i, "sentences": _karpathy_sentences(name, 5)})  # fmt: skip
        if name in OK:
            expected[str(1000 + i)] = [f"{name} sentence {j}." for j in range(5)]
    images[0]["sentences"].append({"raw": "   "})  # one empty caption: dropped, image kept
    images.append({"filepath": "val2014", "filename": NAMES[0], "split": "val", "cocoid": 7, "sentences": []})
    images.append({"filepath": "val2014", "filename": NAMES[1], "split": "test", "cocoid": 8, "sentences": []})
    images.append({"filepath": "val2014", "filename": "good_03.jpg", "split": "train", "cocoid": 9,
                   "sentences": [{"raw": ""}, {"raw": " "}]})  # fmt: skip
    path = tmp / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    skipped = {"empty_caption": 3, "no_caption_left": 1}
    options = {"split": "train", "image_root": srv.base_url}
    return Case("coco", path, expected, expected_failures(NAMES), skipped, len(NAMES) + 1, options)


def case_vg(tmp: Path, srv: FolderServer) -> Case:
    image_data, regions, expected = [], [], {}
    for i, name in enumerate(NAMES):
        image_data.append({"image_id": i + 1, "url": srv.url(name), "width": 800, "height": 600, "coco_id": None})
        phrases = [(f"{name} region", 50, 60), (f"{name.upper()}  REGION", 80, 80), ("a tiny thing", 10, 200),
                   (f"{name} other", 32, 32)]  # fmt: skip
        regions.append({"id": i + 1, "regions": [
            {"region_id": 10 * i + j, "image_id": i + 1, "phrase": p, "width": w, "height": h, "x": 0, "y": 0}
            for j, (p, w, h) in enumerate(phrases)]})  # fmt: skip
        if name in OK:
            expected[str(i + 1)] = [f"{name} region", f"{name} other"]
    image_data += [{"image_id": 100, "url": srv.url(OK[0]) + "?a", "coco_id": 555},
                   {"image_id": 101, "url": srv.url(OK[0]) + "?b", "coco_id": None},
                   {"image_id": 102, "url": srv.url(OK[0]) + "?c", "coco_id": None}]  # fmt: skip
    regions.append({"regions": [{"region_id": 1, "image_id": 101, "phrase": "x", "width": 90, "height": 90}]})
    (tmp / "image_data.json").write_text(json.dumps(image_data))
    (tmp / "region_descriptions.json").write_text(json.dumps(regions))
    (tmp / "exclude.txt").write_text("# eval images\ncoco:555\n101\n")
    skipped = {"duplicate_phrase": len(NAMES), "tiny_region": len(NAMES), "excluded": 2, "no_regions": 1}
    options = {"regions": str(tmp / "region_descriptions.json"), "exclude": str(tmp / "exclude.txt")}
    return Case("vg", tmp / "image_data.json", expected, expected_failures(NAMES), skipped, len(image_data), options)


def case_flickr30k(tmp: Path, srv: FolderServer) -> Case:
    # Local files (file:// URLs): no server, so gone.jpg is a fine image and missing.jpg is absent.
    images = [{"filename": n, "split": "test", "imgid": i, "sentences": _karpathy_sentences(n, 5)}
              for i, n in enumerate(NAMES)]  # fmt: skip
    images.append({"filename": "other.jpg", "split": "train", "imgid": 99, "sentences": _karpathy_sentences("o", 5)})
    path = tmp / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    ok = OK + ["gone.jpg"]
    expected = {Path(n).stem: [f"{n} sentence {j}." for j in range(5)] for n in ok}
    failures = {DECODE_ERROR: 2, "<urlopen error [Errno 2] No such file or directory: '…'>": 1}
    options = {"split": "test", "image_root": str(srv.root)}
    return Case("flickr30k", path, expected, failures, {}, len(NAMES), options)


def case_generic_parquet(tmp: Path, srv: FolderServer) -> Case:
    urls = [srv.url(n) for n in NAMES] + [srv.url("good_00.jpg")]
    texts = [[f"first {n}", f"second {n}"] for n in NAMES] + [["again"]]
    ids = [f"img-{i}" for i in range(len(urls))]
    path = tmp / "list.parquet"
    pq.write_table(pa.table({"image_url": urls, "text": texts, "id": ids, "other": list(range(len(urls)))}), path)
    expected = {f"img-{i}": [f"first {n}", f"second {n}"] for i, n in enumerate(NAMES) if n in OK}
    options = {"url_col": "image_url", "caption_col": "text", "id_col": "id"}
    return Case("generic", path, expected, expected_failures(NAMES), {"duplicate_url": 1}, len(urls), options)


def case_generic_csv(tmp: Path, srv: FolderServer) -> Case:
    rows = ["url,caption"] + [f'{srv.url(n)},"one, for {n}"' for n in NAMES] + [f"{srv.url(n)},two for {n}" for n in OK]
    path = tmp / "list.csv"
    path.write_text("\n".join(rows) + "\n")
    expected = {url_image_id(srv.url(n)): [f"one, for {n}", f"two for {n}"] for n in OK}
    options = {"duplicate_urls": "merge", "split": "val"}
    return Case("generic", path, expected, expected_failures(NAMES), {}, len(rows) - 1, options)


def case_generic_local(tmp: Path, srv: FolderServer) -> Case:
    """--image_root: names inside are read; names escaping it and file:// URLs never are."""
    root = tmp / "images"
    (root / "sub").mkdir(parents=True)
    shutil.copy(srv.root / "good_00.jpg", root / "good_00.jpg")
    shutil.copy(srv.root / "good_01.jpg", root / "sub" / "good_01.jpg")
    shutil.copy(srv.root / "good_03.jpg", tmp / "secret.jpg")  # a decodable image outside the root
    os.symlink(tmp / "secret.jpg", root / "link_out.jpg")
    names = ["good_00.jpg", "sub/good_01.jpg", "../secret.jpg", str(tmp / "secret.jpg"), "link_out.jpg",
             (tmp / "secret.jpg").as_uri(), srv.url("good_02.jpg")]  # fmt: skip
    path = tmp / "local.tsv"
    path.write_text("path\ttext\tid\n" + "".join(f"{n}\tlocal {i}\tL{i}\n" for i, n in enumerate(names)))
    expected = {"L0": ["local 0"], "L1": ["local 1"], "L6": ["local 6"]}
    skipped = {"outside_image_root": 3, "bad_url_scheme": 1}
    examples = {"outside_image_root": [f"{path}:{k}" for k in (4, 5, 6)], "bad_url_scheme": [f"{path}:7"]}
    options = {"image_root": str(root), "url_col": "path", "caption_col": "text", "id_col": "id"}
    return Case("generic", path, expected, {}, skipped, len(names), options, examples)


CASES: dict[str, Callable[[Path, FolderServer], Case]] = {
    "cc3m": case_cc3m, "cc12m": case_cc12m, "sbu_json": case_sbu_json, "sbu_txt": case_sbu_txt,
    "coco": case_coco, "vg": case_vg, "flickr30k": case_flickr30k,
    "generic_parquet": case_generic_parquet, "generic_csv": case_generic_csv, "generic_local": case_generic_local,
}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, server: FolderServer) -> dict[str, tuple[Case, Path, Any]]:
    """Run every case's prep (two at a time) and keep (case, output dir, manifest or exception)."""
    jobs = {}
    for name, make in CASES.items():
        tmp = tmp_path_factory.mktemp(name)
        jobs[name] = (make(tmp, server), tmp / "out")

    def run(item: tuple[Case, Path]) -> Any:
        case, out = item
        try:
            return prepare(case.source, case.input, out, **RUN_OPTIONS, **case.options)
        except Exception as err:  # reported by the test of this case
            return err

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(run, jobs.values())))
    return {name: (*jobs[name], results[name]) for name in jobs}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_prep_source_end_to_end(name: str, prepared: dict[str, tuple[Case, Path, Any]]) -> None:
    case, out, manifest = prepared[name]
    if isinstance(manifest, Exception):
        raise manifest
    check_output(out, manifest, expected=case.expected, failures=case.failures, skipped=case.skipped,
                 input_rows=case.input_rows, source=case.source)  # fmt: skip
    assert manifest["split"] == case.options.get("split")
    if case.examples is not None:
        assert manifest["skipped_examples"] == case.examples
    assert manifest["settings"]["image_size"] == 32 and manifest["settings"]["samples_per_shard"] == 4
    n_rows = manifest["download_rows"]
    assert [s["path"] for s in manifest["shards"]] == [f"shards/{k:05d}.tar" for k in range(-(-n_rows // 4))]
    assert (out / "img2dataset_input.parquet").is_file() and not (out / "shards" / "_tmp").exists()


@pytest.mark.slow
def test_prep_huge_image_is_resized(prepared: dict[str, tuple[Case, Path, Any]]) -> None:
    from prep_testutils import read_samples

    _, out, _ = prepared["cc3m"]
    huge = [s for s in read_samples(out) if s.meta["url"].endswith("/huge.jpg")]
    assert len(huge) == 1
    assert huge[0].image_size == (32, 32)
    assert (huge[0].meta["original_width"], huge[0].meta["original_height"]) == (4000, 4000)
