"""Table of bench/tiny_learning.py runs: zero-shot R@1 (text/image; ITC, ITM re-rank, ITM+ITC) per eval step.

    python bench/tiny_learning_table.py /tmp/learn/final_s*.json
"""

import json
import sys

KEYS = ("itc_txt_r1", "itc_img_r1", "itm_txt_r1", "itm_img_r1", "itmitc_txt_r1", "itmitc_img_r1",
        "cos_img", "cos_txt", "itm_auc_random", "temp", "itc", "itm", "mlm")  # fmt: skip

print("run | step | " + " | ".join(KEYS) + " | chance txt/img | s/step")
for path in sys.argv[1:]:
    run = json.load(open(path))
    for rec in run["history"]:
        vals = " | ".join(f"{rec[k]:.3g}" if k in rec else "-" for k in KEYS)
        print(f"{run['args']['name']} | {rec['step']} | {vals} | {rec['chance_txt_r1']:.2f}/{rec['chance_img_r1']:.2f} "
              f"| {rec['s_per_step']:.3f}")
