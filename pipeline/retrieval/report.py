"""Writing retrieval results: the JSON file, TensorBoard scalars, a console table and a recall@K plot.

Kept apart from the evaluation logic so the numbers are computed once (pipeline/retrieval/metrics.py)
and only presented here. Files are written to a temporary name and renamed (atomic).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from pipeline.runtime.io import write_atomic

logger = logging.getLogger(__name__)

METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")
SCORE_LABELS = {
    "itc": "ITC (unimodal cosine)",
    "itm": "ITM (official)",
    "itm_itc": "ITM + ITC (LAVIS)",
    "itm_itc_logit": "ITM + ITC logits",
    "chance": "chance",
}


def report_stem(dataset: str, split: str | None, task: str = "retrieval") -> str:
    """`<task>_<dataset>_<split>` with characters that are unsafe in file names replaced (the name of
    every evaluation's report, plots and TensorBoard tag)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}_{split or 'all'}")
    return f"{task}_{safe}"


def format_table(metrics: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """Fixed-width table: one row per score, one column per metric (percent)."""
    labels = {name: SCORE_LABELS.get(name, name) for name in metrics}
    width = max([22, *(len(label) + 2 for label in labels.values())])
    head = f"{'score':<{width}}" + "".join(f"{k:>11}" for k in METRIC_KEYS)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for name, values in metrics.items():
        lines.append(f"{labels[name]:<{width}}" + "".join(f"{values.get(k, float('nan')):>11.2f}" for k in METRIC_KEYS))
    return "\n".join(lines)


def format_rerank(versus_itc: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One line per re-ranking score: its R@1 minus ITC's on the same queries, +- one standard error."""
    lines = ["R@1 of re-ranking minus ITC alone (paired over the same queries, +- one standard error):"]
    for name, sides in versus_itc.items():
        parts = []
        for side, label in (("txt_r1", "text"), ("img_r1", "image")):
            d = sides[side]
            parts.append(f"{label} {d['diff']:+.2f} +- {d['se']:.2f} (+{d['gained']:.0f} -{d['lost']:.0f})")
        mean = sides["r1_mean"]
        parts.append(f"mean {mean['diff']:+.2f} +- {mean['se']:.2f}")
        lines.append(f"  {SCORE_LABELS.get(name, name):<22}" + ", ".join(parts))
    return "\n".join(lines)


def tensorboard_scalars(log_dir: Path, prefix: str, metrics: Mapping[str, Mapping[str, float]], step: int) -> None:
    """`<prefix>/<score>/<metric>` scalars at `step` in `log_dir` (the run's tensorboard folder)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for score, values in metrics.items():
            for key, value in values.items():
                writer.add_scalar(f"{prefix}/{score}/{key}", float(value), global_step=step)
    finally:
        writer.close()


def plot_recall(path: Path, curves: Mapping[str, Mapping[str, Mapping[int, float]]], title: str) -> None:
    """Recall@K curves: text retrieval and image retrieval panels, one line per score (PNG)."""
    fig = Figure(figsize=(11, 4.2))  # no pyplot: no display backend needed on cluster nodes
    axes = fig.subplots(1, 2, sharey=True)
    for ax, side, label in (
        (axes[0], "txt", "text retrieval (image query)"),
        (axes[1], "img", "image retrieval (text query)"),
    ):
        for score, curve in curves.items():
            ks = sorted(curve[side])
            style = {"linestyle": "--", "color": "grey"} if score == "chance" else {"marker": "o"}
            ax.plot(ks, [curve[side][k] for k in ks], label=SCORE_LABELS.get(score, score), **style)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
