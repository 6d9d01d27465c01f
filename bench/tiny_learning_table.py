"""Tables of bench/tiny_learning.py runs.

    python bench/tiny_learning_table.py /tmp/learn/final_s*.json            # every metric per eval step
    python bench/tiny_learning_table.py --curve /tmp/learn/recipe_s*.json   # markdown learning curves

`--curve`: zero-shot R@1 (%) text / image per eval step for ITC and ITM re-ranking (ITM+ITC), one row per
step, one column pair per run, and the ITM loss (window mean) beside them; chance on the last line.
"""

import json
import sys

KEYS = ("itc_txt_r1", "itc_img_r1", "itm_txt_r1", "itm_img_r1", "itmitc_txt_r1", "itmitc_img_r1",
        "cos_img", "cos_txt", "itm_auc_random", "itm_auc_hard", "neg_uniq", "temp", "itc", "itm", "mlm")  # fmt: skip


def full(paths: list[str]) -> None:
    print("run | step | " + " | ".join(KEYS) + " | chance txt/img | s/step")
    for path in paths:
        run = json.load(open(path))
        for rec in run["history"]:
            vals = " | ".join(f"{rec[k]:.3g}" if k in rec else "-" for k in KEYS)
            print(f"{run['args']['name']} | {rec['step']} | {vals} | {rec['chance_txt_r1']:.2f}/{rec['chance_img_r1']:.2f} "
                  f"| {rec['s_per_step']:.3f}")  # fmt: skip


def curve(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    names = [r["args"]["name"] for r in runs]
    print("| step | " + " | ".join(f"{n}: ITC txt/img | {n}: ITM+ITC txt/img | {n}: ITM loss" for n in names) + " |")
    print("|---" * (1 + 3 * len(runs)) + "|")
    steps = sorted({rec["step"] for r in runs for rec in r["history"]})
    for step in steps:
        cells = []
        for r in runs:
            rec = next((h for h in r["history"] if h["step"] == step), None)
            if rec is None:
                cells += ["-", "-", "-"]
                continue
            cells.append(f"{rec['itc_txt_r1']:.1f} / {rec['itc_img_r1']:.1f}")
            cells.append(f"{rec['itmitc_txt_r1']:.1f} / {rec['itmitc_img_r1']:.1f}")
            cells.append(f"{rec['itm']:.3f}" if "itm" in rec else "-")
        print(f"| {step} | " + " | ".join(cells) + " |")
    last = runs[0]["history"][-1]
    print(f"\nchance R@1: text {last['chance_txt_r1']:.2f}%, image {last['chance_img_r1']:.2f}%")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--curve":
        curve(args[1:])
    else:
        full(args)
