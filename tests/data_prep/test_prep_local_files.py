"""Lists are untrusted: no row may make prep read a local file, except by name under --image_root.

Web lists (cc3m, cc12m, sbu, vg, generic) accept http(s) URLs only; a file:// URL, a bare path or
another scheme is skipped and counted as `bad_url_scheme`. Local images come from an explicit
--image_root (coco, flickr30k, generic), and a name that escapes it is skipped and counted as
`outside_image_root`. The end-to-end proof that such rows never reach img2dataset is in
test_prep_sources (cases cc3m and generic_local).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data_prep.errors import PrepOptionsError
from data_prep.image_root import ImageRoot
from data_prep.options import parse_options
from data_prep.records import MAX_EXAMPLES, SourceRows, url_scheme
from data_prep.sources import READERS

GOOD = "http://h/good.jpg"
LOCAL = ["file:///etc/passwd", "FILE:///home/me/private.jpg", "file:/etc/passwd", "/etc/passwd", "etc/passwd",
         "ftp://h/x.jpg", "data:image/png;base64,AAAA"]  # fmt: skip


def read(source: str, path: Path, **options: object) -> SourceRows:
    return READERS[source](path, parse_options(source, options))


def _write_web_list(tmp_path: Path, kind: str, urls: list[str]) -> tuple[str, Path, dict[str, str]]:
    """A native list of `kind` with one row per URL; returns (source, path, options)."""
    caps = [f"caption {i}" for i in range(len(urls))]
    if kind == "cc3m":
        path = tmp_path / "cc3m.tsv"
        path.write_text("".join(f"{c}\t{u}\n" for c, u in zip(caps, urls)))
    elif kind == "cc12m":
        path = tmp_path / "cc12m.tsv"
        path.write_text("".join(f"{u}\t{c}\n" for c, u in zip(caps, urls)))
    elif kind == "sbu":
        path = tmp_path / "sbu-captions-all.json"
        path.write_text(json.dumps({"image_urls": urls, "captions": caps, "user_ids": ["u"] * len(urls)}))
    elif kind == "vg":
        path = tmp_path / "image_data.json"
        path.write_text(json.dumps([{"image_id": i, "url": u} for i, u in enumerate(urls)]))
        regions = [{"id": i, "regions": [{"phrase": c, "width": 50, "height": 50}]} for i, c in enumerate(caps)]
        (tmp_path / "regions.json").write_text(json.dumps(regions))
        return "vg", path, {"regions": str(tmp_path / "regions.json")}
    else:
        path = tmp_path / "list.jsonl"
        path.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for c, u in zip(caps, urls)))
        return "generic", path, ({"image_root": str(tmp_path)} if kind == "generic_with_root" else {})
    return kind, path, {}


@pytest.mark.parametrize("kind", ["cc3m", "cc12m", "sbu", "vg", "generic", "generic_with_root"])
def test_web_lists_never_yield_local_files(tmp_path: Path, kind: str) -> None:
    urls = [GOOD, *LOCAL]
    if kind == "generic_with_root":  # a bare path is a name under the root there (next tests), not a URL
        urls = [GOOD, *(u for u in LOCAL if url_scheme(u))]
    source, path, options = _write_web_list(tmp_path, kind, urls)
    rows = read(source, path, **options)
    assert [r.url for r in rows.rows] == [GOOD]
    refused = len(urls) - 1
    assert rows.skipped == {"bad_url_scheme": refused} and rows.input_rows == len(urls)
    examples = rows.skipped_examples["bad_url_scheme"]
    assert len(examples) == min(refused, MAX_EXAMPLES) and all(str(path) in e for e in examples)
    if source in ("cc3m", "cc12m", "generic"):  # line-based lists: the example names the line
        assert examples[0] == f"{path}:2"


def _image_tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/{a.jpg, sub/b.jpg, link_in -> sub/b.jpg, link_out -> ../secret.jpg, dir_out -> .., loop -> loop}."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"a")
    (root / "sub" / "b.jpg").write_bytes(b"b")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"private")
    os.symlink(root / "sub" / "b.jpg", root / "link_in.jpg")
    os.symlink(secret, root / "link_out.jpg")
    os.symlink(tmp_path, root / "dir_out")
    os.symlink(root / "loop", root / "loop")
    return root, secret


def test_image_root_keeps_names_inside(tmp_path: Path) -> None:
    root, secret = _image_tree(tmp_path)
    image_root = ImageRoot(str(root))
    real = root.resolve()
    assert image_root.url("a.jpg") == (real / "a.jpg").as_uri()
    assert image_root.url("sub/b.jpg") == (real / "sub" / "b.jpg").as_uri()
    assert image_root.url("link_in.jpg") == (real / "sub" / "b.jpg").as_uri(), "the resolved file is fetched"
    assert image_root.url("not_there_yet.jpg") == (real / "not_there_yet.jpg").as_uri()  # a download failure later
    escaping = ["../secret.jpg", str(secret), "sub/../../secret.jpg", "sub/../a.jpg", "link_out.jpg",
                "dir_out/secret.jpg", "loop", "a.jpg\x00.png", "//etc/passwd"]  # fmt: skip
    for name in escaping:
        assert image_root.url(name) is None, name

    mirror = ImageRoot("https://mirror.example/coco/")
    assert mirror.url("val2014/a b.jpg") == "https://mirror.example/coco/val2014/a%20b.jpg"
    assert mirror.url("../a.jpg") is None and mirror.url("/a.jpg") is None
    for bad in ("file:///data/coco", "ftp://h/coco"):
        with pytest.raises(PrepOptionsError, match="must be a local folder or an http"):
            ImageRoot(bad)


def test_image_root_sources_skip_and_count_escaping_names(tmp_path: Path) -> None:
    """coco / flickr30k (Karpathy json) and generic: escaping names are skipped with their location."""
    root, secret = _image_tree(tmp_path)
    names = ["a.jpg", "../secret.jpg", str(secret), "link_out.jpg", "link_in.jpg"]
    images = [
        {"filename": n, "split": "test", "cocoid": i, "sentences": [{"raw": f"c{i}"}]} for i, n in enumerate(names)
    ]
    images.append(
        {"filepath": "..", "filename": "secret.jpg", "split": "test", "cocoid": 9, "sentences": [{"raw": "x"}]}
    )
    karpathy = tmp_path / "dataset.json"
    karpathy.write_text(json.dumps({"images": images}))
    generic = tmp_path / "list.tsv"
    generic.write_text("url\tcaption\n" + "".join(f"{n}\tc{i}\n" for i, n in enumerate(names)) + f"{GOOD}\tweb\n")
    real = root.resolve()
    inside = [(real / "a.jpg").as_uri(), (real / "sub" / "b.jpg").as_uri()]
    for source, path, options, where in [
        ("coco", karpathy, {"split": "test"}, f"{karpathy}: images entry 1"),
        ("flickr30k", karpathy, {"split": "test"}, f"{karpathy}: images entry 1"),
        ("generic", generic, {}, f"{generic}:3"),
    ]:
        rows = read(source, path, image_root=str(root), **options)
        expected = inside + ([GOOD] if source == "generic" else [])
        assert [r.url for r in rows.rows] == expected, source
        assert rows.skipped == {"outside_image_root": 3 if source == "generic" else 4}, source
        assert rows.skipped_examples["outside_image_root"][0] == where, source
