"""Does the ITM head carry ranking information? Re-ranking with the trained head vs a re-initialised one.

On a small held-out split, "ITM re-ranking minus ITC" alone cannot say whether the ITM head learned
anything: its paired standard error is 0.7-1.7 R@1 points at 200-400 images, and a head that learned
nothing also re-ranks a weak ITC shortlist to within noise of ITC. This evaluates each checkpoint twice
with the evaluation core of `albef evaluate retrieval` (the split encoded once): as trained, and with
`itm_head` reset to a fresh random init (the fusion encoder unchanged). The gap between the two is what
the trained head adds.

    PYTHONPATH=. python bench/itm_head_ablation.py RUN_OR_CHECKPOINT:TEST_SHARDS [...] [--k_test 16]

Prints, per checkpoint and re-ranking score, R@1 (mean of text and image retrieval) minus ITC's, paired
over the same queries, +- one standard error, for the trained and the re-initialised head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.text import build_tokenizer  # noqa: E402
from pipeline.retrieval.evaluate import (  # noqa: E402
    build_eval_model,
    encode_split,
    load_eval_config,
    metrics_from_scores,
    read_eval_checkpoint,
    score_split,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="CHECKPOINT:TEST_SHARDS (a run folder or a tag folder)")
    p.add_argument("--k_test", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the re-initialised head")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_eval_config(args.k_test, {"num_workers": 0, "device": "cpu", "dataset": "synthetic"})
    device = torch.device("cpu")
    tokenizer = build_tokenizer(cfg.vocab)
    for spec in args.runs:
        checkpoint, data = spec.rsplit(":", 1)
        loaded, model_cfg = read_eval_checkpoint(checkpoint, cfg)
        model = build_eval_model(loaded, model_cfg, cfg, device).eval()
        split = encode_split(model, data, cfg, device, tokenizer)  # the head is not used here: encode once
        line = []
        for head in ("trained", "re-initialised"):
            if head == "re-initialised":
                torch.manual_seed(args.seed)
                model.itm_head.reset_parameters()
            metrics, _, versus_itc = metrics_from_scores(score_split(model, split, cfg, 0, 1), split)
            for score, gain in versus_itc.items():
                g = gain["r1_mean"]
                line.append(f"{head} {score} {g['diff']:+.2f} +- {g['se']:.2f}")
        r1 = (metrics["itc"]["txt_r1"] + metrics["itc"]["img_r1"]) / 2  # ITC does not use the head
        print(f"{checkpoint}: ITC R@1 {r1:.2f}; minus ITC: " + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()
