"""The `albef` command: a thin Fire front end over plain stage functions.

Each command only parses its arguments and calls one function of the stage module that owns the
work, imported lazily so `albef --help` stays fast and a stage's heavy imports (DeepSpeed,
img2dataset) load only when that stage runs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import fire

if TYPE_CHECKING:
    from pipeline.weights.export import Format, Layout


class Finetune:
    """Fine-tuning stages."""

    def retrieval(self, config: str, checkpoint: str, output_dir: str, resume: str = "auto", **overrides: Any) -> int:
        """Fine-tune for image-text retrieval from a pretraining (ours or official) checkpoint."""
        from pipeline.stages.finetune_retrieval import finetune_retrieval

        return finetune_retrieval(
            config=config, checkpoint=checkpoint, output_dir=output_dir, resume=resume, overrides=overrides
        )

    def ve(self, config: str, checkpoint: str, output_dir: str, resume: str = "auto", **overrides: Any) -> int:
        """Fine-tune for SNLI-VE (visual entailment) from a pretraining (ours or official) checkpoint."""
        from pipeline.stages.finetune_ve import finetune_ve

        return finetune_ve(
            config=config, checkpoint=checkpoint, output_dir=output_dir, resume=resume, overrides=overrides
        )

    def vqa(self, config: str, checkpoint: str, output_dir: str, resume: str = "auto", **overrides: Any) -> int:
        """Fine-tune for VQA v2 (answer decoder) from a pretraining (ours or official) checkpoint."""
        from pipeline.stages.finetune_vqa import finetune_vqa

        return finetune_vqa(
            config=config, checkpoint=checkpoint, output_dir=output_dir, resume=resume, overrides=overrides
        )

    def nlvr(self, config: str, checkpoint: str, output_dir: str, resume: str = "auto", **overrides: Any) -> int:
        """Fine-tune for NLVR2 from a text-assignment run (`albef pretrain --config nlvr_ta`) or any ALBEF checkpoint."""
        from pipeline.stages.finetune_nlvr import finetune_nlvr

        return finetune_nlvr(
            config=config, checkpoint=checkpoint, output_dir=output_dir, resume=resume, overrides=overrides
        )

    def grounding(self, config: str, checkpoint: str, output_dir: str, resume: str = "auto", **overrides: Any) -> int:
        """Fine-tune for weakly supervised RefCOCO+ grounding (retrieval losses on image-expression pairs)."""
        from pipeline.stages.finetune_grounding import finetune_grounding

        return finetune_grounding(
            config=config, checkpoint=checkpoint, output_dir=output_dir, resume=resume, overrides=overrides
        )


class Evaluate:
    """Evaluation stages."""

    def retrieval(
        self, checkpoint: str, data: str, output_dir: str, k_test: int | None = None, **overrides: Any
    ) -> dict:
        """Image-text retrieval recall@K with batched ITM re-ranking."""
        from pipeline.stages.evaluate_retrieval import evaluate_retrieval

        return evaluate_retrieval(
            checkpoint=checkpoint, data=data, output_dir=output_dir, k_test=k_test, overrides=overrides
        )

    def ve(self, checkpoint: str, data: str, output_dir: str, **overrides: Any) -> dict:
        """SNLI-VE accuracy (per class too) of a VE checkpoint on an `albef prep snli_ve` split."""
        from pipeline.stages.evaluate_ve import evaluate_ve

        return evaluate_ve(checkpoint=checkpoint, data=data, output_dir=output_dir, overrides=overrides)

    def vqa(self, checkpoint: str, data: str, output_dir: str, **overrides: Any) -> dict:
        """VQA v2: answers (official result JSON) and, with answers, VQA accuracy on an `albef prep vqa` split."""
        from pipeline.stages.evaluate_vqa import evaluate_vqa

        return evaluate_vqa(checkpoint=checkpoint, data=data, output_dir=output_dir, overrides=overrides)

    def nlvr(self, checkpoint: str, data: str, output_dir: str, **overrides: Any) -> dict:
        """NLVR2 accuracy of an NLVR checkpoint (ours or official) on an `albef prep nlvr2` split (dev / test-P)."""
        from pipeline.stages.evaluate_nlvr import evaluate_nlvr

        return evaluate_nlvr(checkpoint=checkpoint, data=data, output_dir=output_dir, overrides=overrides)

    def grounding(self, checkpoint: str, data: str, output_dir: str, **overrides: Any) -> dict:
        """RefCOCO+ grounding accuracy (Grad-CAM proposal ranking, IoU >= 0.5) per split; --write_maps N for PNGs."""
        from pipeline.stages.evaluate_grounding import evaluate_grounding

        return evaluate_grounding(checkpoint=checkpoint, data=data, output_dir=output_dir, overrides=overrides)


class Slurm:
    """Submit the pipeline's stages to a SLURM cluster."""

    def submit(
        self,
        stages: str = "prep,pretrain,finetune,eval",
        config: str | None = None,
        dry_run: bool = False,
        **overrides: Any,
    ) -> int:
        """Submit the stages chained with --dependency=afterok (--dry_run prints the sbatch lines)."""
        from pipeline.slurm.submit import submit_command

        stage_list = stages.split(",") if isinstance(stages, str) else list(stages)
        return submit_command(stage_list, config, dry_run, overrides)

    def status(self, run_dir: str, wait: bool = False, timeout_s: float | None = None) -> int:
        """Final states of a submitted chain (failed job + its log, dependents that never ran);
        --wait polls until all jobs ended (at most --timeout_s, default 7 days)."""
        from pipeline.slurm.submit import DEFAULT_WAIT_TIMEOUT_S, status_command

        return status_command(run_dir, wait, timeout_s=DEFAULT_WAIT_TIMEOUT_S if timeout_s is None else timeout_s)


class CLI:
    """albef: ALBEF pretraining pipeline (prep -> pretrain -> finetune -> evaluate)."""

    def __init__(self) -> None:
        self.finetune = Finetune()
        self.evaluate = Evaluate()
        self.slurm = Slurm()

    def prep(self, source: str, input: str | None = None, output: str | None = None, **options: Any) -> int:
        """Ingest a native dataset list with img2dataset into WebDataset shards + manifest.json."""
        from data_prep.prep import run_prep

        return run_prep(source=source, input=input, output=output, **options)

    def pretrain(
        self, config: str, output_dir: str, resume: str = "auto", checkpoint: str | None = None, **overrides: Any
    ) -> int:
        """Pretrain ALBEF (ITC + ITM + MLM) with DeepSpeed; any config field via --a.b=value. A config with
        `task: text_assignment` (nlvr_ta) runs NLVR2's text-assignment pretraining from --checkpoint."""
        from pipeline.stages.pretrain import pretrain

        return pretrain(config=config, output_dir=output_dir, resume=resume, overrides=overrides, checkpoint=checkpoint)

    def export(self, checkpoint: str, output: str, layout: Layout = "ours", format: Format | None = None) -> int:
        """Consolidated weights (.safetensors by default; .pth for --layout official) + NAME.json + NAME.md card."""
        from pipeline.weights.export import export_command

        return export_command(checkpoint=checkpoint, output=output, layout=layout, format=format)

    def demo(self, workdir: str = "albef_demo", steps: int | None = None, finetune_steps: int | None = None) -> int:
        """The whole pipeline on a laptop CPU: synthetic data -> img2dataset -> pretrain -> finetune -> eval."""
        from pipeline.demo import run_demo

        return run_demo(workdir=workdir, steps=steps, finetune_steps=finetune_steps)


def _exit_code(result: Any) -> int:
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def fire_argv(argv: list[str]) -> list[str]:
    """`albef CMD --help` as Fire's own help request (`albef CMD -- --help`).

    Without this, Fire first tries to call CMD: a missing required flag makes it exit 2, and a
    command taking `**overrides` swallows `--help` as an override.
    """
    words = argv[: argv.index("--")] if "--" in argv else argv
    if not any(a in ("--help", "-h") for a in words):
        return argv
    return [a for a in words if a not in ("--help", "-h")] + ["--", "--help"]


def main(argv: list[str] | None = None) -> None:
    # Fire would print the returned value; stages return exit codes (ints) or small results.
    args = fire_argv(sys.argv[1:] if argv is None else argv)
    result = fire.Fire(CLI, command=args, name="albef", serialize=lambda r: None)
    sys.exit(_exit_code(result))


if __name__ == "__main__":
    main()
