"""A toy task on the real Trainer: accumulation, the queue-update hook, validation/best, NaN stop.

Run as `python tests/pipeline/train/toy_task.py RUN_DIR [--nan_at N] ...` (one process per rank);
the trainer tests start it and read its checkpoints.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from pipeline.config import DeepSpeedSection, LoggingConfig, OptimConfig, TrainConfig, TrainingStageConfig
from pipeline.runtime.distributed import dist_info_from_env
from pipeline.train.launch import run_training
from pipeline.train.task import StepOutput, TrainTask


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--nan_at", type=int, default=-1)
    parser.add_argument("--nan_grad_at", type=int, default=-1, help="a finite loss whose gradient is NaN")
    parser.add_argument("--ds", default="ds_configs/cpu.json")
    parser.add_argument("--max_steps", type=int, default=12)
    parser.add_argument("--save_every", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=2)
    args = parser.parse_args(argv)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1))
            self.scale = nn.Parameter(torch.ones([]))  # 0-d, like ALBEF's temp
            self.register_buffer("begin_calls", torch.zeros((), dtype=torch.long))
            self.register_buffer("micro_calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).squeeze(-1) * self.scale

        def enqueue(self, count: torch.Tensor) -> None:  # the trainer's queue update, all-gathered
            assert count.shape[0] == dist_info_from_env().world_size
            self.micro_calls += 1

    class ToyTask(TrainTask):
        name, best_metric = "toy", "score"
        w = torch.randn(8, generator=torch.Generator().manual_seed(1))

        def build_model(self) -> nn.Module:
            return Toy()

        def samples_per_epoch(self) -> int:
            return 4 * args.grad_accum * 3  # 3 optimizer steps per epoch

        def train_batches(self, *, start_micro_step, segment_steps, rank, world_size):
            g = start_micro_step
            while True:
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(g))
                yield {"x": x, "y": x @ self.w, "step": g, "bad_samples": {"bad_image": 1} if g % 5 == 0 else {}}
                g += 1

        def begin_step(self, model, ctx) -> None:
            model.begin_calls += 1

        def forward(self, engine, batch, ctx) -> StepOutput:
            loss = ((engine(batch["x"]) - batch["y"]) ** 2).mean()
            if ctx.step == args.nan_at:
                loss = loss * float("nan")
            if ctx.step == args.nan_grad_at:  # sqrt'(0) = inf: the loss stays finite, d(loss)/d(scale) = NaN
                scale = engine.module.scale
                loss = loss + 0.0 * torch.sqrt(scale - scale.detach())
            return StepOutput(
                loss=loss, scalars={"loss_mse": loss}, num_samples=4, queue_update={"count": torch.ones(1)}
            )

        def validate(self, model, ctx) -> dict[str, float]:
            x = torch.randn(64, 8, generator=torch.Generator().manual_seed(-1 % 2**31))
            with torch.no_grad():
                return {"score": -float(((model(x) - x @ self.w) ** 2).mean())}

    train = TrainConfig(
        batch_size=4,
        grad_accum_steps=args.grad_accum,
        max_steps=args.max_steps,
        save_every_steps=args.save_every,
        keep_last=2,
        seed=3,
        device="cpu",
    )
    optim = OptimConfig(lr=1e-2, warmup_lr=1e-3, min_lr=1e-3, warmup_steps=2)
    # The real launch path: geometry, DeepSpeed dict, process group, Trainer (NaN -> exit 1, logged).
    sections = TrainingStageConfig(  # only train/optim/deepspeed/logging are read: the task brings the rest
        train=train,
        optim=optim,
        deepspeed=DeepSpeedSection(config=args.ds),
        logging=LoggingConfig(log_every_steps=1, progress_bar="off"),
    )
    return run_training(sections, args.run_dir, "auto", make_task=lambda info: ToyTask())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
