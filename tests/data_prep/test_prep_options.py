"""Option validation of `albef prep` and the exit codes of `run_prep` (no download happens here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.errors import PrepOptionsError
from data_prep.options import parse_options
from data_prep.prep import run_prep


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        ("cc3m", {"imagesize": 64}, "unknown option(s) --imagesize; valid options: "),
        ("cc3m", {"regions": "r.json"}, "option(s) --regions do not apply to source 'cc3m'"),
        ("coco", {"url_col": "u", "split": "val"}, "option(s) --url_col do not apply to source 'coco'"),
        ("coco", {}, "source 'coco' needs --split"),
        ("flickr30k", {"split": "test"}, "source 'flickr30k' needs --image_root"),
        ("vg", {}, "source 'vg' needs --regions"),
        ("cc3m", {"split": "dev"}, "--split must be one of train, val, test, got 'dev'"),
        ("cc3m", {"image_size": "big"}, "--image_size must be an integer, got 'big'"),
        ("cc3m", {"processes": 0}, "--processes must be >= 1, got 0"),
        ("cc3m", {"encode_quality": 101}, "--encode_quality must be <= 100"),
        ("cc3m", {"resize_mode": "stretch"}, "--resize_mode must be one of"),
        ("cc3m", {"overwrite": "maybe"}, "--overwrite must be true or false"),
        ("laion", {}, "unknown source 'laion'"),
    ],
)
def test_bad_options_are_named(source: str, options: dict, message: str) -> None:
    with pytest.raises(PrepOptionsError) as info:
        parse_options(source, options)
    assert message in str(info.value)


def test_options_are_coerced_and_defaulted() -> None:
    opts = parse_options("generic", {"image_size": "64", "url_col": 0, "overwrite": "true", "split": "train"})
    assert (opts.image_size, opts.url_col, opts.overwrite, opts.split) == (64, "0", True, "train")
    assert opts.samples_per_shard == 10000 and opts.resize_mode == "keep_ratio" and opts.processes >= 1


def test_run_prep_exit_code_2_with_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "cc3m.tsv"
    bad.write_text("a\thttp://h/a.jpg\nno tab here\n")
    assert run_prep("cc3m", input=str(bad), output=str(tmp_path / "out")) == 2
    assert f"albef prep: error: {bad}:2: expected 2" in capsys.readouterr().err
    assert run_prep("cc3m", input=str(bad), output=str(tmp_path / "out"), image_sise=3) == 2
    assert "--image_sise" in capsys.readouterr().err
    assert run_prep("cc3m", input=str(bad), output=None) == 2
    assert not (tmp_path / "out" / "shards").exists()


def test_run_prep_no_usable_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cc3m.tsv"
    path.write_text("\tftp://h/a.jpg\n")
    assert run_prep("cc3m", input=str(path), output=str(tmp_path / "out")) == 2
    assert "no usable rows (skipped: {'bad_url_scheme': 1})" in capsys.readouterr().err
