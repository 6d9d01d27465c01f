"""A task whose every rank trains on the SAME batches, run by the real Trainer (one process per rank).

With identical batches the all-reduced gradient equals the one-process gradient, so N ranks must
reproduce the one-process run (up to summation order): the launch tests compare them. The epoch
is 3 steps at any world size; validation is a loop of "batches" that polls the stop flag like the
retrieval evaluation does, and can raise SIGUSR1 on one rank in the middle of it.

    python tests/pipeline/train/replicated_task.py RUN_DIR [--max_steps 9] [--save_every 3]
        [--signal_in_validation STEP --signal_rank R] [--ds DEEPSPEED_CONFIG]

Prints one line `DISTINFO {json}` per rank (rank, local rank, world, master, device for fake
device counts) before training.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from torch import nn

from pipeline.config import DeepSpeedSection, LoggingConfig, OptimConfig, TrainConfig, TrainingStageConfig
from pipeline.runtime.distributed import device_for, dist_info_from_env
from pipeline.runtime.logs import setup_logging
from pipeline.runtime.preemption import check_stop
from pipeline.train.launch import run_training
from pipeline.train.task import StepOutput, TrainTask

BATCH = 4


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class ReplicatedTask(TrainTask):
    name, best_metric = "replicated", "score"
    target = torch.randn(8, generator=torch.Generator().manual_seed(7))

    def __init__(self, world_size: int, signal_step: int, signal_rank: int) -> None:
        self.world_size, self.signal_step, self.signal_rank = world_size, signal_step, signal_rank

    def build_model(self) -> nn.Module:
        return Regressor()

    def samples_per_epoch(self) -> int:
        return BATCH * self.world_size * 3  # 3 optimizer steps per epoch whatever the world size

    def train_batches(self, *, start_micro_step, segment_steps, rank, world_size):
        g = start_micro_step
        while True:  # the same batch on every rank: a function of the micro-step only
            x = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(g))
            yield {"x": x, "y": x @ self.target, "step": g}
            g += 1

    def forward(self, engine, batch, ctx) -> StepOutput:
        loss = ((engine(batch["x"]) - batch["y"]) ** 2).mean()
        return StepOutput(loss=loss, scalars={"loss_mse": loss}, num_samples=BATCH)

    def validate(self, model, ctx) -> dict[str, float]:
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(12345))
        for batch in range(20):  # "batches" of a long evaluation, each followed by the stop check
            if ctx.step == self.signal_step and ctx.rank == self.signal_rank and batch == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            check_stop()
        with torch.no_grad():
            return {"score": -float(((model(x) - x @ self.target) ** 2).mean())}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--max_steps", type=int, default=9)
    parser.add_argument("--save_every", type=int, default=3)
    parser.add_argument("--signal_in_validation", type=int, default=-1)
    parser.add_argument("--signal_rank", type=int, default=0)
    parser.add_argument("--ds", default="ds_configs/cpu_zero2.json")  # ZeRO-2 partitions, as on GPUs
    args = parser.parse_args(argv)

    info = dist_info_from_env()
    setup_logging(info.rank)
    devices = {str(n): str(device_for(info, "cuda", device_count=n)) for n in (1, 2, 8)}
    print("DISTINFO " + json.dumps({**info.__dict__, "devices": devices}), flush=True)
    train = TrainConfig(batch_size=BATCH, max_steps=args.max_steps, save_every_steps=args.save_every, seed=5)
    train.device, train.keep_last = "cpu", 10
    optim = OptimConfig(lr=5e-2, warmup_lr=5e-3, min_lr=5e-3, warmup_steps=2, weight_decay=0.0)
    task = ReplicatedTask(info.world_size, args.signal_in_validation, args.signal_rank)
    sections = TrainingStageConfig(  # only train/optim/deepspeed/logging are read: the task brings the rest
        train=train,
        optim=optim,
        deepspeed=DeepSpeedSection(config=args.ds),
        logging=LoggingConfig(log_every_steps=1, progress_bar="off"),
    )
    return run_training(sections, args.run_dir, "auto", make_task=lambda info: task)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
