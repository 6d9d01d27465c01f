"""`albef demo` end to end with reduced steps: synthetic data -> HTTP -> img2dataset -> pretrain -> fine-tune -> eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.demo import N_TEST, RERANK, run_demo
from pipeline.retrieval.rerank import SCORE_NAMES

STAGES = ("synthesize", "prep", "pretrain", "zero_shot_curve", "eval_zero_shot", "finetune", "eval_fine_tuned")
METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")


@pytest.mark.slow
def test_demo_end_to_end_and_resume(tmp_path: Path, capsys) -> None:
    workdir = tmp_path / "demo"
    assert run_demo(workdir=str(workdir), steps=40, finetune_steps=560) == 0
    out = capsys.readouterr().out
    report = json.loads((workdir / "report.json").read_text())

    for which in ("zero_shot", "fine_tuned"):
        metrics = report["metrics"][which]
        assert set(metrics) == set(SCORE_NAMES), which
        for score in SCORE_NAMES:
            assert set(METRIC_KEYS) <= set(metrics[score]), (which, score)
    chance = report["chance"]
    assert 0 < chance["r_mean"] < 20 and set(METRIC_KEYS) <= set(chance)
    assert set(STAGES) <= set(report["wall_time_s"]) and all(report["wall_time_s"][s] > 0 for s in STAGES)
    tuned = report["metrics"]["fine_tuned"][RERANK]
    assert tuned["r_mean"] > chance["r_mean"], (tuned, chance)
    # the zero-shot R@1 curve: every pretraining checkpoint (every ceil(40 / 6) = 7 steps, and the last)
    curve = report["zero_shot_curve"]
    assert [p["step"] for p in curve] == [7, 14, 21, 28, 35, 40]
    assert all(0 <= p[s] <= 100 for p in curve for s in SCORE_NAMES)
    last = report["metrics"]["zero_shot"]["itc"]
    assert curve[-1]["itc"] == pytest.approx((last["txt_r1"] + last["img_r1"]) / 2)  # same checkpoint, same number
    assert report["r1"]["chance"] == pytest.approx((chance["txt_r1"] + chance["img_r1"]) / 2)
    for which in ("zero_shot", "fine_tuned"):  # the paired difference is the difference of the two R@1
        for score in SCORE_NAMES[1:]:
            gain = report["rerank_vs_itc"][which][score]["r1_mean"]
            r1 = report["r1"][which]
            assert gain["diff"] == pytest.approx(r1[score] - r1["itc"], abs=1e-6) and gain["se"] >= 0, (which, score)
    assert "re-ranking minus ITC alone" in out and f"{RERANK} " in out
    print("\nzero-shot r_mean:", {k: round(v["r_mean"], 1) for k, v in report["metrics"]["zero_shot"].items()},
          "\nfine-tuned r_mean:", {k: round(v["r_mean"], 1) for k, v in report["metrics"]["fine_tuned"].items()},
          "\nchance r_mean:", round(chance["r_mean"], 1),
          "\nwall s:", {k: round(v, 1) for k, v in report["wall_time_s"].items()})  # fmt: skip

    # artifacts the summary points at
    assert (workdir / "report.png").stat().st_size > 0
    assert (workdir / "runs" / "finetune" / "checkpoints" / "best").is_dir()
    assert json.loads((workdir / "data" / "test" / "manifest.json").read_text())["num_samples"] == N_TEST
    assert f"tensorboard --logdir {workdir.resolve() / 'runs'}" in out

    # re-running resumes: every stage is skipped and the report is rewritten unchanged in metrics
    assert run_demo(workdir=str(workdir), steps=40, finetune_steps=560) == 0
    again = json.loads((workdir / "report.json").read_text())
    assert again["skipped_stages"] == list(STAGES) and again["metrics"] == report["metrics"]
