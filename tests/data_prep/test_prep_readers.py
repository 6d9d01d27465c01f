"""Source readers without img2dataset: grouping, skip counts, and errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.errors import PrepInputError, PrepOptionsError
from data_prep.options import parse_options
from data_prep.records import SourceRows, url_image_id
from data_prep.sources import READERS


def read(source: str, path: Path, **options: object) -> SourceRows:
    return READERS[source](path, parse_options(source, options))


def test_cc3m_rows_and_skips(tmp_path: Path) -> None:
    path = tmp_path / "cc3m.tsv"
    path.write_text('a "quoted" caption\thttp://h/a.jpg\n\tHTTP://h/b.jpg\nc\tgs://bucket/c.jpg\nd\thttp://h/a.jpg\n\n')
    rows = read("cc3m", path)
    assert [(r.url, r.captions, r.image_id) for r in rows.rows] == [
        ("http://h/a.jpg", ['a "quoted" caption'], url_image_id("http://h/a.jpg"))
    ]
    assert rows.skipped == {"empty_caption": 1, "bad_url_scheme": 1, "duplicate_url": 1, "blank_line": 1}
    assert rows.input_rows == 4


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        ("a\thttp://h/a.jpg\nb\tc\thttp://h/b.jpg\n", 2, "expected 2 '\\t'-separated columns, found 3"),
        ("a\thttp://h/a.jpg\nb http://h/b.jpg\n", 2, "found 1"),
        ("a\thttp://h/a.jpg\nb\thttp://h/b.jpg\nc\t  \n", 3, "empty URL"),
    ],
)
def test_cc3m_malformed_line_names_file_and_line(tmp_path: Path, content: str, line: int, problem: str) -> None:
    path = tmp_path / "cc3m.tsv"
    path.write_text(content)
    with pytest.raises(PrepInputError) as info:
        read("cc3m", path)
    assert str(info.value).startswith(f"{path}:{line}: ") and problem in str(info.value)


def test_missing_input_and_input_folder(tmp_path: Path) -> None:
    with pytest.raises(PrepInputError, match=r"nope\.tsv: --input TSV not found"):
        read("cc12m", tmp_path / "nope.tsv")
    with pytest.raises(PrepInputError, match=rf"{tmp_path}: --input TSV is a folder, not a file"):
        read("cc3m", tmp_path)
    with pytest.raises(PrepInputError, match=rf"{tmp_path}: --input is a folder, not a file"):
        read("generic", tmp_path)


def test_tsv_not_utf8_row_is_skipped_with_its_line(tmp_path: Path) -> None:
    """One bad byte spoils only its row (cc3m and cc12m); the line number is kept as an example."""
    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_bytes(b"http://h/a.jpg\tok\nhttp://h/b.jpg\t\xff\xfe caf\xe9\nhttp://h/c.jpg\tfine\n")
    rows = read("cc12m", cc12m)
    assert [r.url for r in rows.rows] == ["http://h/a.jpg", "http://h/c.jpg"]
    assert rows.skipped == {"not_utf8": 1} and rows.input_rows == 3
    assert rows.skipped_examples == {"not_utf8": [f"{cc12m}:2"]}
    cc3m = tmp_path / "cc3m.tsv"
    cc3m.write_bytes(b"caf\xe9\thttp://h/a.jpg\ncaf\xc3\xa9\thttp://h/b.jpg\n\x80\thttp://h/c.jpg\n")
    rows = read("cc3m", cc3m)
    assert [(r.url, r.captions) for r in rows.rows] == [("http://h/b.jpg", ["caf\u00e9"])]
    assert rows.skipped == {"not_utf8": 2} and rows.skipped_examples == {"not_utf8": [f"{cc3m}:1", f"{cc3m}:3"]}


def test_text_lists_not_utf8_rows_are_skipped(tmp_path: Path) -> None:
    """The other row-wise readers: sbu txt pair, generic tsv/csv/jsonl (a bad header is an error)."""
    urls = tmp_path / "SBU_captioned_photo_dataset_urls.txt"
    urls.write_bytes(b"http://h/1.jpg\nhttp://h/2.jpg\nhttp://h/3\xff.jpg\n")
    captions = tmp_path / "SBU_captioned_photo_dataset_captions.txt"
    captions.write_bytes(b"one\ntw\xc3o\nthree\n")
    rows = read("sbu", urls)
    assert [r.captions for r in rows.rows] == [["one"]]
    assert rows.skipped_examples == {"not_utf8": [f"{captions}:2", f"{urls}:3"]} and rows.input_rows == 3
    for fmt, header, sep in (("tsv", b"url\tcaption\n", b"\t"), ("csv", b"url,caption\n", b",")):
        path = tmp_path / f"list.{fmt}"
        path.write_bytes(header + b"http://h/a.jpg" + sep + b"\xfe\n" + b"http://h/b.jpg" + sep + b"b\n")
        rows = read("generic", path)
        assert [r.url for r in rows.rows] == ["http://h/b.jpg"], fmt
        assert rows.skipped_examples == {"not_utf8": [f"{path}:2"]}, fmt
        path.write_bytes(b"u\xffrl" + header[3:] + b"http://h/b.jpg" + sep + b"b\n")
        with pytest.raises(PrepInputError, match=rf"{path}:1: header is not valid UTF-8"):
            read("generic", path)
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_bytes(b'{"url": "http://h/a.jpg", "caption": "\xff"}\n{"url": "http://h/b.jpg", "caption": "b"}\n')
    rows = read("generic", jsonl)
    assert [r.url for r in rows.rows] == ["http://h/b.jpg"] and rows.skipped_examples == {"not_utf8": [f"{jsonl}:1"]}


def test_json_not_utf8_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    """A JSON file is parsed whole: no row to skip, so a clear error (exit 2 through run_prep)."""
    sbu = tmp_path / "sbu-captions-all.json"
    sbu.write_bytes(b'{"image_urls": ["http://h/1.jpg"],\n "captions": ["caf\xe9"]}')
    with pytest.raises(PrepInputError, match=rf"{sbu}:2: --input \(sbu-captions-all.json\) is not valid UTF-8"):
        read("sbu", sbu)
    generic = tmp_path / "list.json"
    generic.write_bytes(b'[{"url": "http://h/1.jpg", "caption": "\x80"}]')
    with pytest.raises(PrepInputError, match=rf"{generic}:1: --input is not valid UTF-8"):
        read("generic", generic)
    (tmp_path / "regions.json").write_text("[]")
    exclude = tmp_path / "exclude.txt"
    exclude.write_bytes(b"12\n1\xff3\n")  # an exclusion list must never lose a line silently
    (tmp_path / "image_data.json").write_text("[]")
    with pytest.raises(PrepInputError, match=rf"{exclude}:2: not valid UTF-8"):
        read("vg", tmp_path / "image_data.json", regions=str(tmp_path / "regions.json"), exclude=str(exclude))


def test_cc12m_header_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "cc12m.tsv"
    path.write_text("url\tcaption\nhttp://h/a.jpg\tfirst\nhttps://h/b.jpg\tsecond\n")
    rows = read("cc12m", path)
    assert [(r.url, r.captions) for r in rows.rows] == [("http://h/a.jpg", ["first"]), ("https://h/b.jpg", ["second"])]
    assert rows.input_rows == 2


def test_duplicate_urls_merge(tmp_path: Path) -> None:
    path = tmp_path / "cc12m.tsv"
    path.write_text("http://h/a.jpg\tone\nhttp://h/b.jpg\tb\nhttp://h/a.jpg\ttwo\n")
    rows = read("cc12m", path, duplicate_urls="merge")
    assert [r.captions for r in rows.rows] == [["one", "two"], ["b"]] and rows.skipped == {}


def test_sbu_txt_pair_and_mismatch(tmp_path: Path) -> None:
    urls = tmp_path / "SBU_captioned_photo_dataset_urls.txt"
    urls.write_text("http://h/1.jpg\nhttp://h/2.jpg\n")
    (tmp_path / "SBU_captioned_photo_dataset_captions.txt").write_text("one\ntwo\n")
    assert [r.captions for r in read("sbu", urls).rows] == [["one"], ["two"]]
    (tmp_path / "SBU_captioned_photo_dataset_captions.txt").write_text("one\n")
    with pytest.raises(PrepInputError, match=rf"{urls}:2: no matching line in .*captions.txt"):
        read("sbu", urls)
    other = tmp_path / "caps.txt"
    other.write_text("x\ny\n")
    assert [r.captions for r in read("sbu", urls, captions_file=str(other)).rows] == [["x"], ["y"]]


def test_sbu_json_column_lengths_must_match(tmp_path: Path) -> None:
    path = tmp_path / "sbu-captions-all.json"
    path.write_text(json.dumps({"image_urls": ["http://h/1.jpg"], "captions": ["a", "b"], "user_ids": ["u"]}))
    with pytest.raises(PrepInputError, match="column lists differ in length"):
        read("sbu", path)
    path.write_text('{"image_urls": [')
    with pytest.raises(PrepInputError, match=rf"{path}:1: invalid JSON"):
        read("sbu", path)


def _karpathy(tmp_path: Path, images: list[dict]) -> Path:
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def _img(split: str, cocoid: int, n: int = 2) -> dict:
    return {"filepath": "val2014", "filename": f"COCO_val2014_{cocoid:012d}.jpg", "split": split, "cocoid": cocoid,
            "sentences": [{"raw": f"caption {cocoid}.{j}"} for j in range(n)]}  # fmt: skip


def test_coco_splits_and_urls(tmp_path: Path) -> None:
    path = _karpathy(tmp_path, [_img("train", 1), _img("restval", 2), _img("val", 3), _img("test", 4)])
    train = read("coco", path, split="train")
    assert [r.image_id for r in train.rows] == ["1", "2"] and train.input_rows == 2
    assert train.rows[0].url == "http://images.cocodataset.org/val2014/COCO_val2014_000000000001.jpg"
    assert train.rows[0].captions == ["caption 1.0", "caption 1.1"]
    assert [r.image_id for r in read("coco", path, split="val").rows] == ["3"]
    local = read("coco", path, split="test", image_root=str(tmp_path)).rows[0]
    assert local.url == (tmp_path.resolve() / "val2014" / "COCO_val2014_000000000004.jpg").as_uri()
    mirror = read("coco", path, split="test", image_root="https://mirror.example/coco/").rows[0]
    assert mirror.url == "https://mirror.example/coco/val2014/COCO_val2014_000000000004.jpg"


def test_karpathy_errors(tmp_path: Path) -> None:
    broken = _img("train", 5)
    del broken["sentences"]
    path = _karpathy(tmp_path, [_img("train", 1), broken])
    with pytest.raises(PrepInputError, match=rf"{path}: images entry 1: missing key 'sentences'"):
        read("coco", path, split="train")
    with pytest.raises(PrepOptionsError, match="is not a folder"):
        read("flickr30k", path, split="train", image_root=str(tmp_path / "no_such_dir"))


def test_flickr30k_ids_are_file_stems(tmp_path: Path) -> None:
    images = [{"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "Two men."}]},
              {"filename": "10002456.jpg", "split": "train", "sentences": [{"raw": "A dog."}]}]  # fmt: skip
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images}))
    rows = read("flickr30k", path, split="test", image_root=str(tmp_path)).rows
    assert [(r.image_id, r.captions, r.url) for r in rows] == [
        ("1000092795", ["Two men."], (tmp_path.resolve() / "1000092795.jpg").as_uri())
    ]


def test_vg_filtering(tmp_path: Path) -> None:
    image_data = [{"image_id": 1, "url": "http://h/1.jpg", "coco_id": None},
                  {"id": 2, "url": "http://h/2.jpg", "coco_id": 99},
                  {"image_id": 3, "url": "http://h/3.jpg", "coco_id": None}]  # fmt: skip
    regions = [{"id": 1, "regions": [
        {"phrase": "a red car", "width": 40, "height": 40}, {"phrase": "A red  car ", "width": 90, "height": 90},
        {"phrase": "small", "width": 5, "height": 100}, {"phrase": "a tree", "width": 20, "height": 20}]},
        {"id": 2, "regions": [{"phrase": "x", "width": 50, "height": 50}]}]  # fmt: skip
    (tmp_path / "image_data.json").write_text(json.dumps(image_data))
    (tmp_path / "regions.json").write_text(json.dumps(regions))
    (tmp_path / "exclude.txt").write_text("coco:99  # refcoco+ val\n")
    rows = read("vg", tmp_path / "image_data.json", regions=str(tmp_path / "regions.json"),
                exclude=str(tmp_path / "exclude.txt"), min_region_size=16)  # fmt: skip
    assert [(r.image_id, r.captions) for r in rows.rows] == [("1", ["a red car", "a tree"])]
    assert rows.skipped == {"duplicate_phrase": 1, "tiny_region": 1, "excluded": 1, "no_regions": 1}
    (tmp_path / "exclude.txt").write_text("12\nimage 7\n")
    with pytest.raises(PrepInputError, match=r"exclude.txt:2: expected an image id or coco:<id>"):
        read(
            "vg",
            tmp_path / "image_data.json",
            regions=str(tmp_path / "regions.json"),
            exclude=str(tmp_path / "exclude.txt"),
        )


GENERIC_ROWS = [("http://h/a.jpg", "cap a", "A"), ("http://h/b.jpg", "cap, b", "B"), ("ftp://h/c.jpg", "c", "C")]


def _write_generic(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"u": [r[0] for r in GENERIC_ROWS], "t": [r[1] for r in GENERIC_ROWS],
                                 "i": [r[2] for r in GENERIC_ROWS]}), path)  # fmt: skip
    elif fmt == "csv":
        path.write_text("u,t,i\n" + "".join(f'{u},"{t}",{i}\n' for u, t, i in GENERIC_ROWS))
    elif fmt == "tsv":
        path.write_text("u\tt\ti\n" + "".join(f"{u}\t{t}\t{i}\n" for u, t, i in GENERIC_ROWS))
    elif fmt == "json":
        path.write_text(json.dumps([{"u": u, "t": t, "i": i} for u, t, i in GENERIC_ROWS]))
    else:
        path.write_text("".join(json.dumps({"u": u, "t": t, "i": i}) + "\n" for u, t, i in GENERIC_ROWS))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "json", "jsonl"])
def test_generic_formats_read_the_same(tmp_path: Path, fmt: str) -> None:
    rows = read("generic", _write_generic(tmp_path, fmt), url_col="u", caption_col="t", id_col="i")
    assert [(r.url, r.captions, r.image_id) for r in rows.rows] == [
        ("http://h/a.jpg", ["cap a"], "A"),
        ("http://h/b.jpg", ["cap, b"], "B"),
    ]
    assert rows.skipped == {"bad_url_scheme": 1} and rows.input_rows == 3


def test_generic_errors(tmp_path: Path) -> None:
    path = _write_generic(tmp_path, "csv")
    with pytest.raises(PrepInputError, match=r"missing column\(s\) \['url'\]"):
        read("generic", path, caption_col="t")
    with open(path, "a") as f:
        f.write("http://h/d.jpg,d\n")
    with pytest.raises(PrepInputError, match=rf"{path}:5: expected 3 columns \(as the header\), found 2"):
        read("generic", path, url_col="u", caption_col="t")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"url": "http://h/a.jpg", "caption": "a"}\n{"url": \n')
    with pytest.raises(PrepInputError, match=rf"{jsonl}:2: invalid JSON"):
        read("generic", jsonl)
    (tmp_path / "list.txt").write_text("url caption\n")
    with pytest.raises(PrepOptionsError, match="pass --input_format"):
        read("generic", tmp_path / "list.txt")
    pq.write_table(pa.table({"url": ["http://h/a.jpg", None], "caption": ["a", "b"]}), tmp_path / "n.parquet")
    with pytest.raises(PrepInputError, match=r"n.parquet: row 1: empty URL"):
        read("generic", tmp_path / "n.parquet")


def test_generic_list_captions(tmp_path: Path) -> None:
    path = tmp_path / "albef_style.json"
    path.write_text(json.dumps([{"url": "http://h/a.jpg", "caption": ["one", "", "two"]},
                                {"url": "http://h/b.jpg", "caption": ["", " "]}]))  # fmt: skip
    rows = read("generic", path)
    assert [r.captions for r in rows.rows] == [["one", "two"]]
    assert rows.skipped == {"empty_caption": 3, "no_caption_left": 1}
