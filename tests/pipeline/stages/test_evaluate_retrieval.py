"""`albef evaluate retrieval`: outputs, checkpoint layouts, config errors, 2-process == 1-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import ALBEFConfig, build_albef
from model.convert import to_official
from pipeline.config import REPO_ROOT, ConfigError
from pipeline.retrieval.report import METRIC_KEYS
from pipeline.retrieval.rerank import SCORE_NAMES
from pipeline.stages.evaluate_retrieval import evaluate_retrieval, load_eval_config

from pipeline_testutils import make_synthetic_splits

FAST = {"num_workers": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    return make_synthetic_splits(tmp_path_factory.mktemp("data"), n_train=48, n_test=20, image_size=32)["test"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    """A random tiny pretraining model saved as an exported file (our layout + its config)."""
    torch.manual_seed(0)
    cfg = ALBEFConfig.tiny(image_size=32, queue_size=16)
    state = build_albef(cfg).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": state, "model_config": cfg.to_dict()}, path)
    return path, state


def test_outputs_json_plot_tensorboard(test_split: Path, tiny_ckpt, tmp_path: Path) -> None:
    report = evaluate_retrieval(str(tiny_ckpt[0]), str(test_split), str(tmp_path), k_test=8, overrides=FAST)
    written = json.loads((tmp_path / "eval" / "retrieval_synthetic_test.json").read_text())
    assert written["k_test"] == 8 and written["num_images"] == 20 and written["num_texts"] == 60
    assert written["checkpoint"] == str(tiny_ckpt[0]) and written["config"]["k_test"] == 8
    assert written["time_s"] > 0
    for score in SCORE_NAMES:
        assert set(written["metrics"][score]) == set(METRIC_KEYS)
        assert all(0.0 <= v <= 100.0 for v in written["metrics"][score].values())
        assert written["metrics"][score] == pytest.approx(report["metrics"][score])
    assert written["chance"]["img_r1"] == pytest.approx(5.0)  # 1 of 20 images
    for score in SCORE_NAMES[1:]:  # re-ranking vs ITC on the same queries: the R@1 difference, paired
        versus = written["rerank_vs_itc"][score]
        for side, n in (("txt_r1", 20), ("img_r1", 60)):
            diff = written["metrics"][score][side] - written["metrics"]["itc"][side]
            assert versus[side]["diff"] == pytest.approx(diff, abs=1e-6), (score, side)
            assert versus[side]["gained"] - versus[side]["lost"] == round(diff * n / 100), (score, side)
    assert (tmp_path / "eval" / "retrieval_synthetic_test.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "eval/retrieval_synthetic_test/itm/r_mean" in tags and len(tags) == len(SCORE_NAMES) * len(METRIC_KEYS)


def test_official_layout_and_resolution_override(test_split: Path, tiny_ckpt, tmp_path: Path) -> None:
    """The same weights in the official layout give the same numbers; image_res resamples pos-embed."""
    ours = evaluate_retrieval(str(tiny_ckpt[0]), str(test_split), str(tmp_path / "a"), k_test=8, overrides=FAST)
    official = tmp_path / "official.pth"
    torch.save({"model": to_official(tiny_ckpt[1]), "config": {"image_res": 32}}, official)
    theirs = evaluate_retrieval(
        str(official),
        str(test_split),
        str(tmp_path / "b"),
        k_test=8,
        overrides={**FAST, "preset": "tiny", "image_res": 32},
    )
    assert theirs["metrics"] == ours["metrics"]
    bigger = evaluate_retrieval(
        str(tiny_ckpt[0]), str(test_split), str(tmp_path / "c"), k_test=8, overrides={**FAST, "image_res": 48}
    )
    assert bigger["model_config"]["vision"]["image_size"] == 48


def test_config_errors_name_the_key(test_split: Path, tiny_ckpt: tuple[Path, dict], tmp_path: Path, capfd) -> None:
    with pytest.raises(ConfigError, match="k_tst"):
        load_eval_config(None, {"k_tst": 3})
    with pytest.raises(ConfigError, match="'k_test'"):
        load_eval_config(0, {})
    assert load_eval_config(16, {"eval.pairs_per_batch": "64"}).pairs_per_batch == 64
    bad_pth = tmp_path / "bad.pth"
    bad_pth.write_bytes(b"not a torch file")
    for ckpt, overrides, key in [
        (tmp_path / "missing.pth", FAST, "checkpoint"),
        (bad_pth, FAST, "checkpoint"),
        (tiny_ckpt[0], {**FAST, "eval.image_res": 50}, "image_res"),  # not a multiple of the checkpoint's patch
    ]:
        with pytest.raises(SystemExit) as exc:  # the stage: one line naming the key, exit code 2
            evaluate_retrieval(str(ckpt), str(test_split), str(tmp_path / "out"), overrides=overrides)
        assert exc.value.code == 2 and f"config key '{key}'" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()


def _cli(args: list[str], rank: int, world: int, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "evaluate", "retrieval", *args],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one(test_split: Path, tiny_ckpt, tmp_path: Path) -> None:
    """Rows split over 2 gloo ranks and all-gathered == one process, score matrices bit for bit
    (`exact`: per-row arithmetic independent of the batch); the fast path agrees to 1e-5."""
    import socket

    args = [
        "--checkpoint",
        str(tiny_ckpt[0]),
        "--data",
        str(test_split),
        "--k_test",
        "8",
        "--num_workers=0",
        "--device=cpu",
        "--save_scores=true",
        "--pairs_per_batch=7",
        "--exact=true",
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_cli([*args, "--output_dir", str(tmp_path / "two")], r, 2, port) for r in range(2)]
    single = evaluate_retrieval(
        str(tiny_ckpt[0]),
        str(test_split),
        str(tmp_path / "one"),
        k_test=8,
        overrides={**FAST, "save_scores": True, "pairs_per_batch": 64, "exact": True},
    )
    evaluate_retrieval(
        str(tiny_ckpt[0]),
        str(test_split),
        str(tmp_path / "fast"),
        k_test=8,
        overrides={**FAST, "save_scores": True, "pairs_per_batch": 64},
    )
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    two = json.loads((tmp_path / "two" / "eval" / "retrieval_synthetic_test.json").read_text())
    assert two["world_size"] == 2 and single["world_size"] == 1
    assert two["metrics"] == single["metrics"]
    a = torch.load(tmp_path / "one" / "eval" / "retrieval_synthetic_test_scores.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "eval" / "retrieval_synthetic_test_scores.pt", weights_only=True)
    assert sorted(a) == sorted(b) == sorted(f"{s}_{d}" for s in SCORE_NAMES for d in ("i2t", "t2i"))
    fast = torch.load(tmp_path / "fast" / "eval" / "retrieval_synthetic_test_scores.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
        finite = torch.isfinite(a[key])
        assert torch.equal(finite, torch.isfinite(fast[key])), key
        assert torch.allclose(a[key][finite], fast[key][finite], rtol=0, atol=1e-5), key
    assert torch.isfinite(a["itm_i2t"]).sum() == 20 * 8  # only the top k of each query is re-ranked
