"""The tiny pretraining recipe through `albef pretrain` itself, over seeds: zero-shot R@1 per score.

Where bench/tiny_learning.py is a lean loop without DeepSpeed, this runs the real stage (DeepSpeed,
bf16 autocast, the WebDataset loader) on the synthetic set of tests/pipeline/test_tiny_learning.py and
evaluates each run with `albef evaluate retrieval` on a held-out split. Issue 11's comparison of ITM
negatives (pipeline/configs/pretrain_tiny_cpu.yaml comments):

    PYTHONPATH=. python bench/tiny_recipe_seeds.py --workdir /tmp/pl --n_test 400 \
        mixed:0 random:0 mixed:1 random:1 mixed:2 random:2

Each argument is ITM_NEGATIVES:SEED. Prints one line per run: R@1 (text, image) per score, their
means and each re-ranking's R@1 minus ITC's with its paired standard error; the runs stay under WORKDIR/<kind>_s<seed>.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests" / "pipeline")]

from pipeline_testutils import make_synthetic_splits, pretrain_cmd  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="ITM_NEGATIVES:SEED, e.g. mixed:0")
    p.add_argument("--workdir", default="/tmp/tiny_recipe_seeds")
    p.add_argument("--n_train", type=int, default=2000)
    p.add_argument("--n_test", type=int, default=400)
    p.add_argument("--k_test", type=int, default=16)
    args = p.parse_args()
    root = Path(args.workdir)
    data = root / "data"
    if not (data / "test").exists():
        make_synthetic_splits(data, n_train=args.n_train, n_test=args.n_test)
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}  # one plain process, as a user runs it
    env["PYTHONPATH"] = str(REPO_ROOT)
    for spec in args.runs:
        kind, seed = spec.split(":")
        run = root / f"{kind}_s{seed}"
        extra = (f"--train.seed={seed}", f"--model.itm_negatives={kind}", "--train.save_every_steps=300")
        with open(root / f"{kind}_s{seed}.log", "w") as log:
            cmd = pretrain_cmd(run, data / "train", *extra)
            subprocess.check_call(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        evaluate = [sys.executable, "-m", "pipeline.cli", "evaluate", "retrieval", "--checkpoint", str(run),
                    "--data", str(data / "test"), "--output_dir", str(run), "--k_test", str(args.k_test),
                    "--num_workers=0", "--device=cpu", "--dataset=synthetic"]  # fmt: skip
        subprocess.run(evaluate, env=env, cwd=REPO_ROOT, capture_output=True, check=True)
        report = json.loads((run / "eval" / "retrieval_synthetic_test.json").read_text())
        metrics = report["metrics"]
        gains = {s: g["r1_mean"] for s, g in report["rerank_vs_itc"].items()}
        r1 = {s: (m["txt_r1"], m["img_r1"]) for s, m in metrics.items()}
        mean = {s: (t + i) / 2 for s, (t, i) in r1.items()}
        print(
            f"{kind} seed {seed}: R@1 (text, image) "
            + ", ".join(f"{s} ({t:.1f}, {i:.1f})" for s, (t, i) in r1.items())
            + " | mean "
            + ", ".join(f"{s} {v:.2f}" for s, v in mean.items())
            + " | minus ITC (paired s.e.) "
            + ", ".join(f"{s} {g['diff']:+.2f} +- {g['se']:.2f}" for s, g in gains.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
