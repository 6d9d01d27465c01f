"""Checkpoint commit and `--resume auto` resolution on tag folders built here (no DeepSpeed).

The commit protocol: every rank's files, a barrier, then rank 0 writes `commit.json` and `latest`
atomically. A kill between the shard writes and the commit, a `latest` naming an incomplete or
missing tag, or a truncated file must resume from the newest complete tag, and tags that exist
must never be trained over from scratch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.runtime import checkpoint


def shard(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def make_tag(ckpt: Path, tag: str | int, ranks: int = 2, *, commit: bool = True, latest: bool = False) -> str:
    """A tag folder as a save of `ranks` ranks leaves it; committed (record, `latest`) if asked."""
    name = checkpoint.tag_for(tag) if isinstance(tag, int) else tag
    folder = ckpt / name
    folder.mkdir(parents=True)
    (folder / checkpoint.MODEL_STATES).write_bytes(b"model" * 10)
    for r in range(ranks):
        (folder / shard(r)).write_bytes(b"optim" * (r + 3))
    if commit:
        checkpoint.write_commit(ckpt, name, ranks, latest=latest)
    return name


def test_commit_record_lists_every_file_and_latest_is_written_last(tmp_path: Path) -> None:
    make_tag(tmp_path, 4, ranks=3, latest=True)
    record = json.loads((tmp_path / "global_step4" / checkpoint.COMMIT_FILE).read_text())
    assert record["world_size"] == 3 and record["tag"] == "global_step4"
    assert set(record["files"]) == {checkpoint.MODEL_STATES, shard(0), shard(1), shard(2)}
    assert checkpoint.latest_name(tmp_path) == "global_step4"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    assert checkpoint.resolve_resume("auto", tmp_path) == (tmp_path, "global_step4")


def test_kill_between_shard_writes_and_commit_resumes_from_previous_tag(tmp_path: Path) -> None:
    make_tag(tmp_path, 4, latest=True)
    # Step 8: rank 0 wrote its files, rank 1 had not finished; nobody reached the commit.
    make_tag(tmp_path, 8, ranks=1, commit=False)  # rank 1's partition never written
    assert checkpoint.incomplete_reason(tmp_path, "global_step8") == "not committed (no commit.json)"
    assert checkpoint.resolve_resume("auto", tmp_path) == (tmp_path, "global_step4")
    # Even with every file there, a tag is only complete once rank 0 committed it after the barrier.
    (tmp_path / "global_step8" / shard(1)).write_bytes(b"optim")
    assert checkpoint.resolve_resume("auto", tmp_path) == (tmp_path, "global_step4")


def test_latest_naming_an_incomplete_tag_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_tag(tmp_path, 4, latest=True)
    make_tag(tmp_path, 8, latest=True)
    (tmp_path / "global_step8" / shard(1)).unlink()  # the record says two ranks: one is missing
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve_resume("auto", tmp_path) == (tmp_path, "global_step4")
    assert "names global_step8, which is incomplete" in caplog.text and shard(1) in caplog.text


def test_a_truncated_file_makes_a_tag_incomplete(tmp_path: Path) -> None:
    make_tag(tmp_path, 4)
    make_tag(tmp_path, 8, latest=True)
    (tmp_path / "global_step8" / checkpoint.MODEL_STATES).write_bytes(b"mod")
    assert "bytes" in (checkpoint.incomplete_reason(tmp_path, "global_step8") or "")
    assert checkpoint.resolve_resume("auto", tmp_path) == (tmp_path, "global_step4")


def test_dangling_latest_resumes_from_newest_complete_tag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_tag(tmp_path, 3)
    make_tag(tmp_path, 6)
    make_tag(tmp_path, 9, commit=False, ranks=2)  # a save that died before its commit
    (tmp_path / "latest").write_text("global_step12")  # names a tag that is gone
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve_resume("auto", tmp_path) == (tmp_path, "global_step6")
    assert "names global_step12" in caplog.text


def test_tags_without_a_complete_one_are_never_trained_over(tmp_path: Path) -> None:
    make_tag(tmp_path, 3, commit=False, ranks=0)
    (tmp_path / "global_step3" / checkpoint.MODEL_STATES).unlink()
    (tmp_path / "latest").write_text("global_step3")
    with pytest.raises(checkpoint.ResumeError, match="global_step3: mp_rank_00_model_states.pt missing"):
        checkpoint.resolve_resume("auto", tmp_path)
    # No tags at all: a fresh run (a dangling pointer alone is only warned about).
    (tmp_path / "global_step3").rmdir()
    assert checkpoint.resolve_resume("auto", tmp_path) is None


def test_tags_of_older_code_without_a_record_are_judged_by_their_files(tmp_path: Path) -> None:
    make_tag(tmp_path, 2, ranks=4, commit=False)
    assert checkpoint.incomplete_reason(tmp_path, "global_step2") is None
    (tmp_path / "global_step2" / shard(2)).unlink()
    assert checkpoint.incomplete_reason(tmp_path, "global_step2") == "optimizer partition of rank(s) [2] missing"


class FakeEngine:
    """`save_checkpoint` as DeepSpeed's: each rank's files under save_dir/tag (one rank here)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        self.calls.append(save_latest)
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / checkpoint.MODEL_STATES).write_bytes(b"new model states")
        if self.fail:
            raise KeyboardInterrupt("killed before rank 0's partition was written")
        (folder / shard(0)).write_bytes(b"new partition")


def test_save_commits_after_the_files_and_a_killed_save_stays_uncommitted(tmp_path: Path) -> None:
    engine = FakeEngine()
    checkpoint.save(engine, tmp_path, "global_step4", {}, keep_last=None, is_main=True, world_size=1)
    assert engine.calls == [False]  # DeepSpeed never writes `latest` itself
    assert checkpoint.latest_name(tmp_path) == "global_step4"
    assert checkpoint.incomplete_reason(tmp_path, "global_step4") is None

    # Overwriting `best` (or a re-trained step) uncommits it first: a kill mid-overwrite is seen.
    checkpoint.save(engine, tmp_path, "best", {}, keep_last=None, is_main=True, world_size=1, latest=False)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(fail=True), tmp_path, "best", {}, keep_last=None, is_main=True, world_size=1)
    # The old files are all still there, but the record went first: `best` reads as uncommitted.
    assert checkpoint.incomplete_reason(tmp_path, "best") == "not committed (no commit.json)"
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(fail=True), tmp_path, "global_step8", {}, keep_last=None, is_main=True)
    assert checkpoint.latest_name(tmp_path) == "global_step4"
    assert checkpoint.resolve_resume("auto", tmp_path) == (tmp_path, "global_step4")


def test_zero_layout_of_a_tag_must_match_the_engine(tmp_path: Path) -> None:
    zero = tmp_path / make_tag(tmp_path, 2, ranks=2)
    plain = tmp_path / make_tag(tmp_path, 4, ranks=0)  # stage 0: the optimizer is in the model states
    checkpoint.check_zero_layout(zero, 2)
    checkpoint.check_zero_layout(plain, 0)
    with pytest.raises(checkpoint.ResumeError, match="written with ZeRO .* uses ZeRO stage 0"):
        checkpoint.check_zero_layout(zero, 0)
    with pytest.raises(checkpoint.ResumeError, match=r"written without ZeRO \(stage 0\).* uses ZeRO stage 2"):
        checkpoint.check_zero_layout(plain, 2)
