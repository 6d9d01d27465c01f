"""The one DeepSpeed training loop, shared by pretraining and fine-tuning (see pipeline/train/task.py).

Per optimizer step (all ranks in lockstep):
    seed the RNG from (seed, step, micro-step, rank)   -> dropout, masking, hard negatives are a
                                                           pure function of the step: exact resume
    LR <- lr_at(step) on every param group              -> no scheduler state to save
    task.begin_step                                     -> ALBEF: EMA of the momentum encoders,
                                                           ONCE per optimizer step, before the
                                                           forward (official order: the EMA follows
                                                           the weights, which only change at steps)
    for each of grad_accum_steps micro-batches:
        task.forward -> engine.backward -> model.enqueue(**all_gathered(out.queue_update))
                                                        -> ALBEF: enqueue the all-gathered momentum
                                                           features of EVERY micro-batch (after the
                                                           backward, whose graph may still read the
                                                           queue), so the queue holds the most
                                                           recent queue_size negatives whatever the
                                                           accumulation, as in the official code
                                                           where each iteration enqueues
        engine.step()                                   -> DeepSpeed applies the update at the
                                                           accumulation boundary (fp16: skips and
                                                           counts overflow steps)
    all-reduce [non-finite loss or grad norm, stop signal] -> every rank stops after the same step
    log every N steps / validate at epoch ends / checkpoint every M steps and at the end

DeepSpeed set-up: only trainable parameters go to the optimizer, in two groups (the official ones:
no weight decay on biases and other 1-D parameters such as LayerNorm; 0-d temp is decayed). Floating buffers
(ALBEF: momentum twins and queues) are snapshotted before `deepspeed.initialize` and restored in
fp32 if the engine cast them (DeepSpeed 0.19.8 casts parameters, not buffers, and the model keeps
its twins fp32 under casts; the guard makes the invariant explicit), then broadcast from rank 0
(DeepSpeed broadcasts parameters only).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from model.distributed import all_gather_no_grad
from pipeline.config import LoggingConfig, OptimConfig, TrainConfig
from pipeline.runtime import checkpoint, preemption
from pipeline.runtime.distributed import DistInfo, device_for
from pipeline.runtime.ds_config import precision_of
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE, FINISHED_EXIT_CODE, PREEMPTED_EXIT_CODE
from pipeline.runtime.io import torch_load_weights_only
from pipeline.runtime.preemption import PreemptionHandler
from pipeline.runtime.seeds import derive_seed
from pipeline.runtime.tb_logger import TBLogger, console_line
from pipeline.train.geometry import TrainGeometry
from pipeline.train.schedule import alpha_at, lr_at
from pipeline.train.task import StepContext, StepOutput, TrainTask

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss in fp32/bf16 training: the run stops without saving (last good checkpoint kept)."""


@dataclass
class RunState:
    """Progress saved in every checkpoint's client state (next to DeepSpeed's own counters)."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # images consumed, all ranks
    bad_samples: int = 0  # skipped samples, all ranks
    best_value: float | None = None  # best validation metric so far (fine-tuning)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups, exactly the official `add_weight_decay`: no decay on
    1-D parameters (LayerNorm, biases) and on names ending in `.bias`; everything else is decayed,
    including the 0-d `temp` and the ViT's cls_token / pos_embed (the official model lists no
    `no_weight_decay` names)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


class Trainer:
    """Runs a TrainTask with DeepSpeed; `fit(resume)` returns the process exit code."""

    def __init__(
        self,
        task: TrainTask,
        *,
        train: TrainConfig,
        optim: OptimConfig,
        logging_cfg: LoggingConfig,
        ds_config: dict[str, Any],
        dist_info: DistInfo,
        device: str,
        run_dir: str | Path,
        geometry: TrainGeometry,
        resolved_config: dict[str, Any] | None = None,
    ) -> None:
        self.task, self.train_cfg, self.optim_cfg, self.log_cfg = task, train, optim, logging_cfg
        self.ds_config, self.dist, self.run_dir = ds_config, dist_info, Path(run_dir)
        self.resolved_config = resolved_config or {}
        self.precision = precision_of(ds_config)
        self.device = device_for(dist_info, device)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = RunState()
        self.engine: Any = None
        self.preemption = PreemptionHandler()
        self.preempt_marker = preemption.marker_path()  # the sbatch scripts requeue when it exists
        self.geometry = geometry
        self._step_grad_norm: torch.Tensor | None = None  # ours, for engines that report none (ZeRO stage 0)
        self._takes_own_grad_norm = False  # decided in setup(), once the engine exists

    # -- set-up ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build the model (seeded: identical on every rank) and the DeepSpeed engine."""
        torch.manual_seed(self.train_cfg.seed)
        model = self.task.build_model().to(self.device)
        groups = weight_decay_groups(model, self.optim_cfg.weight_decay)
        # Host copy of the fp32 buffers (momentum twins, queues) in case the engine casts them.
        kept = {n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers() if b.dtype == torch.float32}
        scalars = [p for p in model.parameters() if p.ndim == 0]
        for p in scalars:
            # DeepSpeed 0.19.8's _broadcast_model does p.data.view(torch.uint8), which raises for 0-d
            # tensors (ALBEF's temp). This attribute makes it skip them; we broadcast them below.
            setattr(p, "ds_optim_param", True)  # noqa: B010 - an attribute DeepSpeed looks up by name
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config)
        for p in scalars:
            delattr(p, "ds_optim_param")  # noqa: B043
        self._restore_fp32_buffers(kept)
        self._broadcast(list(self.engine.module.buffers()) + scalars)
        # Without ZeRO, DeepSpeed computes no norm unless a half-precision optimizer needs one; fp16 engines
        # keep DeepSpeed's own overflow handling.
        self._takes_own_grad_norm = self.engine.zero_optimization_stage() == 0 and self.precision != "fp16"
        if self.dist.world_size == 1 and self.engine.zero_optimization_stage() == 0:
            # Nothing to all-reduce on one rank, yet DeepSpeed's stage-0 path would still flatten every
            # gradient into buckets, "reduce" them and copy them back: ~30% of a one-process CPU step
            # of ALBEF-base (bench/pretrain.py --profile). ZeRO engines reduce in their own hooks.
            self.engine.enable_backward_allreduce = False
            logger.info("one rank without ZeRO: DeepSpeed's gradient all-reduce is skipped")
        n_train = sum(p.numel() for g in groups for p in g["params"])
        logger.info(
            "engine ready: %s, ZeRO stage %d, %.2fM trainable params; training geometry:\n%s",
            self.precision,
            self.engine.zero_optimization_stage(),
            n_train / 1e6,
            self.geometry.table(),
        )

    def _restore_fp32_buffers(self, kept: dict[str, torch.Tensor]) -> None:
        """Undo any cast of fp32 buffers by the engine: re-copy the pre-initialize fp32 values."""
        module = self.engine.module
        restored = []
        for name, buf in list(module.named_buffers()):
            if name in kept and buf.dtype != torch.float32:
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                owner._buffers[attr] = kept[name].to(buf.device)
                restored.append(name)
        if restored:
            logger.warning("engine cast %d fp32 buffers; restored them in fp32 (e.g. %s)", len(restored), restored[0])

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values everywhere (buffers and the 0-d parameters DeepSpeed does not broadcast)."""
        if dist.is_initialized() and self.dist.world_size > 1:
            for t in tensors:
                dist.broadcast(t.data, src=0)

    # -- resume ------------------------------------------------------------------------------------------
    def resume(self, resume: str | None) -> None:
        """Load the checkpoint `--resume` names (auto: this run's latest), if any."""
        found = checkpoint.resolve_resume(resume, self.ckpt_dir)
        if found is None:
            if str(resume).lower() not in ("auto", "none"):
                raise FileNotFoundError(f"--resume {resume}: nothing to resume from")
            logger.info("starting from scratch (resume=%s)", resume)
            return
        client = checkpoint.load(self.engine, *found, load_file=torch_load_weights_only)
        run = client.get("run", {})
        self.state = RunState(
            step=int(run.get("step", 0)),
            samples_seen=int(run.get("samples_seen", 0)),
            bad_samples=int(run.get("bad_samples", 0)),
            best_value=run.get("best_value"),
        )
        data = client.get("data", {})
        if client.get("world_size") != self.dist.world_size or data.get("seed") != self.train_cfg.seed:
            logger.warning(
                "resuming with world size %s / seed %s (checkpoint: %s / %s): the data stream will differ",
                self.dist.world_size,
                self.train_cfg.seed,
                client.get("world_size"),
                data.get("seed"),
            )
        changed = _config_diff(client.get("config") or {}, self.resolved_config)
        if changed:
            logger.warning("config differs from the checkpoint's: %s", "; ".join(changed[:20]))
        logger.info("resumed at step %d (%d samples seen)", self.state.step, self.state.samples_seen)

    def client_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "run": {
                "step": s.step,
                "samples_seen": s.samples_seen,
                "bad_samples": s.bad_samples,
                "best_value": s.best_value,
                "epoch": self.geometry.epoch_of(s.step),
            },
            "data": {
                "seed": self.train_cfg.seed,
                "micro_step": s.step * self.train_cfg.grad_accum_steps,
                "segment_steps": self.geometry.segment_steps,
            },
            "rng": {
                "scheme": "torch.manual_seed(derive_seed(seed, step, micro_step, rank)) before every micro-step",
                "seed": self.train_cfg.seed,
            },
            "geometry": self.geometry.to_dict(),
            "world_size": self.dist.world_size,
            "task": self.task.name,
            "config": self.resolved_config,
            **self.task.export_extra(),
        }

    def _check_replicas(self) -> None:
        """Fail loudly if ranks hold different weights/buffers (e.g. queues updated unevenly): a
        checkpoint stores rank 0's module only, so a silent divergence would be lost on resume."""
        if not (dist.is_initialized() and self.dist.world_size > 1):
            return
        module = self.engine.module
        tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
        sums = torch.stack([t.detach().double().sum() for t in tensors])
        gathered = [torch.empty_like(sums) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, sums)
        if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
            raise RuntimeError(f"model replicas differ across ranks at step {self.state.step}")

    def save(self, tag: str | None = None, latest: bool = True) -> None:
        self._check_replicas()
        tag = tag or checkpoint.tag_for(self.state.step)
        keep = self.train_cfg.keep_last if tag != checkpoint.BEST_TAG else None
        checkpoint.save(
            self.engine,
            self.ckpt_dir,
            tag,
            self.client_state(),
            keep_last=keep,
            is_main=self.dist.is_main,
            world_size=self.dist.world_size,
            latest=latest,
        )

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self, resume: str | None = "auto") -> int:
        """Train to `total_steps`; returns 0 when finished, PREEMPTED_EXIT_CODE after a signal."""
        self.preemption.install()  # before the loader forks its workers (they inherit the handler)
        tb = TBLogger(self.run_dir / "tensorboard", enabled=self.dist.is_main)
        try:
            if self.engine is None:
                self.setup()
            try:
                self.resume(resume)
            except checkpoint.ResumeError as err:
                logger.error("%s", err)
                return CONFIG_ERROR_EXIT_CODE
            tb.text("config", _yaml(self.resolved_config))
            code = self._loop(tb)
            # Leave the process group cleanly (NCCL warns otherwise, and a rank still in
            # teardown when srun reaps the step is reported as killed).
            if dist.is_initialized():
                dist.destroy_process_group()
            return code
        finally:
            tb.close()
            self.preemption.uninstall()

    def _loop(self, tb: TBLogger) -> int:
        accum = self.train_cfg.grad_accum_steps
        batches = InterruptibleBatches(
            self.task.train_batches(
                start_micro_step=self.state.step * accum,
                segment_steps=self.geometry.segment_steps,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            ),
            self.preemption.signals,
            lambda: self.preemption.requested,
        )
        window = _Window()
        window.reset(self.state.samples_seen)
        progress = self._progress_bar()
        self.engine.train()
        consecutive_skips = 0
        while self.state.step < self.geometry.total_steps:
            try:
                nonfinite, samples, bad = self.train_step(batches, window)
            except DataWaitInterrupted as err:
                logger.warning(
                    "%s: the loader is still searching (bad samples?); exiting %d without a new checkpoint "
                    "(the last one is %s)",
                    err,
                    PREEMPTED_EXIT_CODE,
                    checkpoint.read_latest(self.ckpt_dir) or "none",
                )
                return PREEMPTED_EXIT_CODE
            consecutive_skips = 0 if self._step_applied() else consecutive_skips + 1
            stop, nonfinite, samples, bad = self._agree(self.preemption.requested, nonfinite, samples, bad)
            self.state.step += 1
            self.state.samples_seen += samples
            self.state.bad_samples += bad
            if progress is not None:
                progress.update(1)
            if nonfinite and self.precision != "fp16":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {self.state.step - 1} ({self.precision}); stopping without saving. "
                    f"The last good checkpoint is {checkpoint.read_latest(self.ckpt_dir) or 'none (no checkpoint yet)'} in {self.ckpt_dir}"
                )
            if consecutive_skips >= self.train_cfg.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"{consecutive_skips} fp16 overflow steps in a row (loss scale {self.loss_scale():g}); giving up"
                )
            if (
                self.state.step % self.log_cfg.log_every_steps == 0
                or self.state.step == self.geometry.total_steps
                or stop
            ):
                self._log(window, tb)
            if self.state.step % self.geometry.steps_per_epoch == 0 and self._validate(tb):
                stop = True  # a stop signal arrived during validation
            if (
                self.state.step % self.train_cfg.save_every_steps == 0
                or self.state.step == self.geometry.total_steps
                or stop
            ):
                self.save()
            if stop:
                self._mark_preempted()
                logger.warning(
                    "preempted: checkpoint saved at step %d, exiting %d", self.state.step, PREEMPTED_EXIT_CODE
                )
                return PREEMPTED_EXIT_CODE
        if progress is not None:
            progress.close()
        logger.info("finished: %d steps", self.state.step)
        return FINISHED_EXIT_CODE

    def _mark_preempted(self) -> None:
        """Rank 0 writes the requeue marker after the committed save; no rank exits before it exists."""
        if self.dist.is_main and self.preempt_marker is not None:
            preemption.write_marker(self.preempt_marker, self.state.step, self.preemption.received)
        if dist.is_initialized():
            dist.barrier()

    def _context(self, micro: int) -> StepContext:
        step = self.state.step
        return StepContext(
            step=step,
            micro_step=micro,
            epoch=self.geometry.epoch_of(step),
            alpha=alpha_at(step, alpha=self.train_cfg.alpha, ramp_steps=self.geometry.alpha_ramp_steps),
            geometry=self.geometry,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def train_step(self, batches: Any, window: _Window | None = None) -> tuple[bool, int, int]:
        """One optimizer step at `state.step` over grad_accum_steps micro-batches of `batches` (an
        iterator). Does not advance `state.step` (the loop does, after the ranks agreed); benches
        call it directly after `setup()`.

        Returns (a loss was non-finite, images consumed, bad samples skipped) on this rank."""
        window = window if window is not None else _Window()
        lr = lr_at(
            self.state.step,
            lr=self.optim_cfg.lr,
            warmup_lr=self.optim_cfg.warmup_lr,
            min_lr=self.optim_cfg.min_lr,
            warmup_steps=self.geometry.warmup_steps,
            total_steps=self.geometry.total_steps,
            schedule=self.optim_cfg.schedule,
            steps_per_epoch=self.geometry.steps_per_epoch,
        )
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        module = self.engine.module
        torch.manual_seed(derive_seed(self.train_cfg.seed, self.state.step, 0, self.dist.rank))
        self.task.begin_step(module, self._context(0))
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        samples = bad = 0
        for micro in range(self.train_cfg.grad_accum_steps):
            ctx = self._context(micro)
            t0 = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - t0
            self._check_alignment(batch, micro)
            torch.manual_seed(derive_seed(self.train_cfg.seed, self.state.step, micro, self.dist.rank))
            with self._autocast():
                out = self.task.forward(self.engine, batch, ctx)
            nonfinite |= ~torch.isfinite(out.loss.detach())
            self.engine.backward(out.loss)
            if out.queue_update:
                # After the backward, whose graph may still read the queue: every micro-batch's
                # momentum features of all ranks (rank order) enter the queue.
                module.enqueue(**{name: all_gather_no_grad(t) for name, t in out.queue_update.items()})
            if micro == self.train_cfg.grad_accum_steps - 1:
                self._step_grad_norm = self._own_grad_norm()
            self.engine.step()
            window.add(out, ctx.alpha)
            samples += out.num_samples
            bad += sum(self.task.bad_samples(batch).values())
        nonfinite |= self._nonfinite_grad_norm()
        window.lr, window.steps = lr, window.steps + 1
        return bool(nonfinite), samples, bad

    def _nonfinite_grad_norm(self) -> torch.Tensor:
        """Whether this step's global gradient norm is inf/NaN, as a device flag (no host sync).

        A finite loss can still give NaN gradients (e.g. sqrt at 0). DeepSpeed's per-gradient
        overflow scan is off in our bf16 configs (`check_grad_overflow: false`: ~5,500 kernel
        launches per ALBEF-base step, 40% of all); the norm DeepSpeed computes anyway covers the same
        case with one check, and the loop then stops without saving, as for a non-finite loss."""
        norm = self.grad_norm()
        if norm is None:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return ~torch.isfinite(torch.as_tensor(norm, device=self.device))

    def grad_norm(self) -> float | torch.Tensor | None:
        """The last step's global gradient norm: DeepSpeed's (ZeRO computes one), else ours."""
        norm = self.engine.get_global_grad_norm()
        return norm if norm is not None else self._step_grad_norm

    def _own_grad_norm(self) -> torch.Tensor | None:
        """The global norm where DeepSpeed reports none (see setup): after the accumulation boundary's
        all-reduce and before the step clears the gradients (one foreach norm)."""
        if not self._takes_own_grad_norm:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())

    def _check_alignment(self, batch: Any, micro: int) -> None:
        expected = self.state.step * self.train_cfg.grad_accum_steps + micro
        got = batch.get("step", expected) if isinstance(batch, dict) else expected
        if got not in (expected, -1):
            raise RuntimeError(f"data stream out of step: batch for micro-step {got}, trainer at {expected}")

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Half-precision runs go under autocast so fp32 momentum twins meet half activations."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _agree(self, stop: bool, nonfinite: bool, samples: int, bad: int) -> tuple[bool, bool, int, int]:
        """Sum-reduce [stop, non-finite, samples, bad] over ranks: every rank takes the same stop
        decision after the same step, and the progress counters are global."""
        if not (dist.is_initialized() and self.dist.world_size > 1):
            return stop, nonfinite, samples, bad
        vec = torch.tensor(
            [float(stop), float(nonfinite), float(samples), float(bad)], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(vec)
        vec = vec.cpu()
        return bool(vec[0] > 0), bool(vec[1] > 0), int(vec[2]), int(vec[3])

    def _step_applied(self) -> bool:
        applied = getattr(self.engine, "was_step_applied", None)
        return bool(applied()) if callable(applied) else True

    def loss_scale(self) -> float:
        """The current fp16 dynamic loss scale (1.0 for fp32/bf16)."""
        if self.precision != "fp16":
            return 1.0
        opt = self.engine.optimizer
        scale = getattr(opt, "loss_scale", None) or getattr(opt, "cur_scale", None)
        return float(scale) if scale is not None else float("nan")

    # -- logging / validation ------------------------------------------------------------------------------
    def _log(self, window: _Window, tb: TBLogger) -> None:
        values = window.reduce(self.device, self.dist.world_size, self.state.samples_seen)
        values["train/lr"] = window.lr
        values["train/loss_scale"] = self.loss_scale()
        grad_norm = self.grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            values["train/grad_norm"] = float(grad_norm)
        values["train/skipped_steps"] = float(self.engine.skipped_steps)
        values["data/bad_samples"] = float(self.state.bad_samples)
        values["perf/samples_seen"] = float(self.state.samples_seen)
        window.reset(self.state.samples_seen)
        if self.dist.is_main:
            tb.scalars(values, self.state.step)
            tb.flush()
            logger.info(
                console_line(
                    self.state.step, self.geometry.total_steps, self.state.step / self.geometry.steps_per_epoch, values
                )
            )

    def _validate(self, tb: TBLogger) -> bool:
        """Validate (and save `best`); returns True when a stop signal interrupted it."""
        poll = preemption.StopPoll(self.preemption, self.device, self.dist.world_size)
        try:
            # The evaluation polls the stop flag between batches (collectively), so a signal
            # during a long validation is acted on within a batch, not after the whole split.
            with self._autocast(), preemption.polling(poll):  # same precision regime as training
                metrics = self.task.validate(self.engine.module, self._context(0))
        except preemption.StopRequested:
            logger.warning("validation at step %d interrupted by a stop signal", self.state.step)
            return True
        finally:
            self.engine.train()  # whatever mode validation left the module in
        if not metrics:
            return False
        tb.scalars({f"val/{k}": v for k, v in metrics.items()}, self.state.step)
        if self.dist.is_main:
            logger.info(
                "validation at step %d: %s", self.state.step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            )
        best = self.task.best_metric
        if (
            best is not None
            and best in metrics
            and (self.state.best_value is None or metrics[best] > self.state.best_value)
        ):
            self.state.best_value = float(metrics[best])
            self.save(tag=checkpoint.BEST_TAG, latest=False)
        return False

    def _progress_bar(self) -> Any:
        mode = self.log_cfg.progress_bar
        if not self.dist.is_main or mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
            return None
        return tqdm(total=self.geometry.total_steps, initial=self.state.step, desc=self.task.name, dynamic_ncols=True)


class _Window:
    """Sums over the steps since the last log line; reduced across ranks once per log line."""

    def __init__(self) -> None:
        self.samples_at_start: int | None = None
        self.reset()

    def reset(self, samples_seen: int | None = None) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.steps = 0
        self.data_wait = 0.0
        self.lr = 0.0
        self.samples_at_start = samples_seen
        self.t0 = time.perf_counter()

    def add(self, out: StepOutput, alpha: float) -> None:
        scalars = dict(out.scalars)
        scalars["loss_total"] = out.loss
        scalars["alpha"] = alpha
        for name, value in scalars.items():  # summed where they live: no host sync per step on a GPU
            v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self.sums[name] = v if name not in self.sums else self.sums[name] + v.to(self.sums[name].device)
        self.micro += 1

    def reduce(self, device: torch.device, world_size: int, samples_seen: int) -> dict[str, float]:
        """Means of the task scalars over micro-steps and ranks, plus throughput and data-wait.

        `samples_seen` is the global image count now; the window's images are the difference
        from its value at the previous log line (the first window starts at the resume point)."""
        names = sorted(self.sums)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        sums = [self.sums[n].to(device, torch.float64).reshape(()) for n in names]  # one sync for all
        vec = torch.stack([*sums, torch.tensor(self.data_wait, dtype=torch.float64, device=device)])
        vec[: len(names)] /= max(self.micro, 1)
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(vec)
        vec = vec.cpu()
        out = {f"train/{n}": float(vec[i]) / world_size for i, n in enumerate(names)}
        wait = float(vec[-1]) / world_size
        samples = samples_seen - (self.samples_at_start or 0)
        out["perf/images_per_s"] = samples / elapsed
        out["perf/images_per_s_per_gpu"] = samples / elapsed / world_size
        out["perf/data_wait_s"] = wait / max(self.steps, 1)
        out["perf/data_wait_frac"] = min(1.0, wait / elapsed)
        return out


DATA_WAIT_GRACE_S = 10.0  # seconds a batch may still take after a stop signal before the wait is abandoned


class DataWaitInterrupted(BaseException):
    """No batch came within DATA_WAIT_GRACE_S of a stop signal (the loader keeps skipping bad samples?).

    A BaseException, like KeyboardInterrupt, which it resembles: raised from a signal handler at
    any point of the loader's code, it must pass the `except Exception` skip handlers there."""


class InterruptibleBatches:
    """An iterator over `batches` whose `next()` gives up some time after a stop signal.

    The preemption handler only raises a flag that the loop reads between steps. Normally the batch
    arrives, the step completes and every rank checkpoints and exits 75 together. A loader that
    keeps skipping bad samples never returns to the loop, though: so once a stop signal has come
    (during the wait, or before it began), the wait lasts at most `grace_s` more seconds (SIGALRM),
    then raises DataWaitInterrupted. Only the main thread can set signal handlers; elsewhere
    `next()` is a plain one.
    """

    def __init__(
        self,
        batches: Any,
        signals: tuple[signal.Signals, ...],
        stop_requested: Callable[[], bool],
        grace_s: float = DATA_WAIT_GRACE_S,
    ) -> None:
        self._it: Iterator[Any] = iter(batches)
        self._signals, self._stop_requested, self._grace_s = signals, stop_requested, grace_s

    def __iter__(self) -> InterruptibleBatches:
        return self

    def __next__(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return next(self._it)
        # getsignal is None for a handler not set from Python: leave such a signal alone.
        previous = {sig: h for sig in self._signals if (h := signal.getsignal(sig)) is not None}
        alarm: list[Any] = []  # (previous SIGALRM handler, previous timer) once armed

        def on_alarm(signum: int, frame: FrameType | None) -> None:
            raise DataWaitInterrupted(f"no batch {self._grace_s:g} s after the stop signal")

        def arm() -> None:  # SIGALRM is touched only after a stop signal, never on the normal path
            if not alarm:
                alarm.append(signal.signal(signal.SIGALRM, on_alarm))
                alarm.append(signal.setitimer(signal.ITIMER_REAL, self._grace_s))

        def on_stop(signum: int, frame: FrameType | None) -> None:
            handler = previous[signal.Signals(signum)]
            if callable(handler):
                handler(signum, frame)  # the preemption flag
            arm()

        for sig in previous:
            signal.signal(sig, on_stop)
        try:
            if self._stop_requested():
                arm()
            return next(self._it)
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, signal.SIG_DFL if alarm[0] is None else alarm[0])
                signal.setitimer(signal.ITIMER_REAL, *alarm[1])  # whoever used the timer before (0 = none)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two nested config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)
