"""Option validation of `albef prep` and the exit codes of `run_prep` (no download happens here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.errors import PrepOptionsError
from data_prep.options import parse_options
from data_prep.prep import run_prep

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_max_pixels_defaults_to_pils_limit() -> None:
    from PIL import Image

    assert parse_options("cc3m", {}).max_pixels == Image.MAX_IMAGE_PIXELS
    assert parse_options("cc3m", {"max_pixels": "1000"}).max_pixels == 1000
    with pytest.raises(PrepOptionsError, match="--max_pixels must be >= 1, got 0"):
        parse_options("cc3m", {"max_pixels": 0})


def test_image_root_applies_to_generic_but_not_web_sources() -> None:
    assert parse_options("generic", {"image_root": "/data/images"}).image_root == "/data/images"
    with pytest.raises(PrepOptionsError, match="--image_root do not apply to source 'cc3m'"):
        parse_options("cc3m", {"image_root": "/data/images"})


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", "cc3m", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("input_arg", "output_arg", "message"),
    [
        ("list.tsv", "taken.txt", "albef prep: error: --output taken.txt is not a folder"),
        ("list.tsv", "taken.txt/out", "albef prep: error: --output taken.txt/out cannot be created: taken.txt is not"),
        (None, "out", "albef prep: error: --input is required"),
        ("folder", "out", "albef prep: error: folder: --input TSV is a folder, not a file"),
        ("nope.tsv", "out", "albef prep: error: nope.tsv: --input TSV not found"),
    ],
)
def test_cli_bad_paths_exit_2_with_one_line(
    tmp_path: Path, input_arg: str | None, output_arg: str, message: str
) -> None:
    """Through the real CLI: exit 2, exactly one line on stderr naming the path, nothing written."""
    (tmp_path / "list.tsv").write_text("a caption\thttp://127.0.0.1:9/a.jpg\n")
    (tmp_path / "taken.txt").write_text("someone's file\n")
    (tmp_path / "folder").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = ([f"--input={input_arg}"] if input_arg else []) + [f"--output={output_arg}"]
    result = _cli(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "taken.txt").read_text() == "someone's file\n"


def test_run_prep_output_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("a caption\thttp://127.0.0.1:9/a.jpg\n")
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert run_prep("cc3m", input=str(tsv), output=str(taken)) == 2
    assert capsys.readouterr().err == f"albef prep: error: --output {taken} is not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cc3m.tsv", "taken"] and taken.read_text() == "x"
