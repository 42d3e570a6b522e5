"""The training loop: data -> engine.train_step -> metrics, evaluation and checkpoints.

The loop never asks which engine it drives. Its whole resumable state is the optimizer step, the number of global
samples consumed (which fixes the data position for any data-parallel size), the RNG states and the early-stopping
counters; everything else comes from the config.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from megatron_lite import rules
from megatron_lite.config import Config, ConfigError
from megatron_lite.data import GlobalBatchLoader, build_datasets
from megatron_lite.engines import Engine, build_engine
from megatron_lite.errors import first_line
from megatron_lite.families import get_family
from megatron_lite.step.schedules import lr_at
from megatron_lite.topology import Topology
from megatron_lite.step.checkpoint_format import find_latest
from megatron_lite.training.checkpoint import load_checkpoint, recover, save_checkpoint
from megatron_lite.training.cluster import RankLog, apply_collective_timeout, banner, explain_lost_peer, gather_hosts
from megatron_lite.training.metrics import (
    MetricsLogger,
    device_peak_flops,
    format_train_line,
    max_over_ranks,
    peak_memory_bytes,
)
from megatron_lite.training.nonfinite import StepHealth
from megatron_lite.training.pause_points import pause_point
from megatron_lite.training.preflight import check_data_fits_model
from megatron_lite.training.run_lock import lock_run_dirs
from megatron_lite.training.signals import StopRequest


@dataclass
class TrainResult:
    """What a run did: used by the quickstart, the tests and the layout-parity harness."""

    losses: list[float] = field(default_factory=list)  # train loss of each step run in this process
    steps: list[int] = field(default_factory=list)  # the step number (1-based) of each loss
    valid_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    final_step: int = 0
    checkpoint: Path | None = None
    run_dir: Path | None = None
    stopped_early: bool = False
    stopped_by: str | None = None  # the signal (SIGTERM, SIGINT) that stopped the run after a checkpoint


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    """Builds the pieces from a config and runs the loop. ``run()`` returns a TrainResult."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.topology = Topology.from_env(cfg.parallel, cfg.training.device)
        topo = self.topology
        self.log = log if topo.is_main else (lambda *_: None)
        engine = rules.check_layout(cfg, topo.world_size, topo.device.type)  # before anything is built
        self.global_batch = cfg.global_batch_size
        seed_everything(cfg.training.seed, cfg.training.deterministic)
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        # one live run per directory; then, still alone in it, clean up what a crash left (training/run_lock.py)
        self.locks = lock_run_dirs([self.run_dir, self.ckpt_root], topo, then=lambda: recover(self.ckpt_root, self.log))
        self.rank_log = RankLog(self.run_dir, topo)
        self.log = self._logger(log)
        self.hosts = gather_hosts(topo)
        self.health = StepHealth(cfg.training.max_skipped_steps, cfg.training.loss_spike_factor)

        self.log(banner(topo, engine, self.hosts))
        self.log("resolved config:\n" + cfg.to_yaml())

        t = cfg.training
        check_data_fits_model(cfg)
        self.datasets = build_datasets(
            cfg.data,
            {"train": t.train_steps * self.global_batch, "valid": t.eval_samples, "test": t.eval_samples},
            log=self.log,
        )
        if t.early_stopping_patience and self.datasets.get("valid") is None:
            raise ConfigError(
                f"training.early_stopping_patience={t.early_stopping_patience} needs a validation split, "
                f"but data.split={cfg.data.split!r} gives it no documents"
            )
        family = get_family(cfg.model.family)
        with torch.device("meta"):  # shapes only: the engine builds just this rank's part of the model
            self.n_params = sum(p.numel() for p in family.construct(cfg.model).parameters())
        self.engine: Engine = build_engine(cfg, family.factory(cfg, topo), topo, family.task(cfg, topo))
        apply_collective_timeout(cfg.parallel.timeout_s)  # groups made by the mesh, the engine and the pipeline too
        # Dropout streams differ across data-parallel (and pipeline) ranks from here on, and agree across the ranks of
        # a tensor-parallel group, which hold the same replicated activations (parallel/random.py).
        torch.manual_seed(t.seed + topo.rank // topo.tp)

        self.step = 0
        self.consumed_samples = 0
        self.best_valid = float("inf")
        self.evals_without_improvement = 0
        self._resume()

        self.flops_per_token = _flops_per_token(cfg)
        self.peak_flops = device_peak_flops(cfg.logging, topo.device, t.precision)
        self.metrics = MetricsLogger(cfg, self.run_dir, enabled=topo.is_main, echo=self.log)
        self.log(
            f"model: {self.n_params:,} parameters, {self.flops_per_token:,.0f} training FLOPs/token; "
            f"global batch {self.global_batch} x {cfg.data.seq_len} tokens; run dir {self.run_dir}"
        )

    def _logger(self, console: Callable[[str], None]) -> Callable[[str], None]:
        """Every rank writes its own log file; rank 0 also prints."""
        if not self.topology.is_main:
            return self.rank_log.write_line

        def both(line: str) -> None:
            console(line)
            sys.stdout.flush()
            self.rank_log.write_line(line)

        return both

    def _resume(self) -> None:
        cfg = self.cfg.checkpoint
        if not cfg.resume and any(self.ckpt_root.glob("step_*")):
            # fail now rather than at the first save, after hours of training that could not be kept
            raise ConfigError(
                f"checkpoint.resume=false but {self.ckpt_root} already holds checkpoints of another run; "
                "set checkpoint.dir (or logging.run_dir) to a new directory, or resume"
            )
        path = find_latest(self.ckpt_root) if cfg.resume else None
        if path is None and cfg.load:
            path = Path(cfg.load)
        if path is None and cfg.init_from:  # weights only: step, schedule, data position and optimizer stay new
            from megatron_lite.training.init_from import init_weights

            return init_weights(cfg.init_from, self.engine, self.cfg, self.ckpt_root, self.log)
        if path is None:
            return
        meta = load_checkpoint(path, self.engine)
        state = meta["trainer_state"]
        self.step = meta["step"]
        self.consumed_samples = meta["consumed_samples"]
        best = state.get("best_valid")  # saved as null before the first evaluation
        self.best_valid = float("inf") if best is None else best
        self.evals_without_improvement = state.get("evals_without_improvement", 0)
        self.log(f"resumed from {path} at step {self.step} ({self.consumed_samples:,} samples consumed)")

    def trainer_state(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "best_valid": self.best_valid if self.best_valid != float("inf") else None,
            "evals_without_improvement": self.evals_without_improvement,
        }

    def save(self) -> Path:
        path = save_checkpoint(
            self.ckpt_root, self.step, self.engine, self.cfg, self.trainer_state(), self.cfg.checkpoint.keep_last
        )
        self.log(f"saved checkpoint {path}")
        return path

    def evaluate(self) -> float:
        t = self.cfg.training
        ds = self.datasets.get("valid")
        if ds is None:
            return float("nan")
        pause_point("eval", self.step, self.topology.is_main)
        loader = GlobalBatchLoader(
            ds, t.eval_samples, t.micro_batch_size, self.topology.dp_rank, self.topology.dp, 0, prefetch=0
        )
        return self.engine.eval_loss(next(iter(loader)))

    def _record_eval(self, result: TrainResult) -> bool:
        """Evaluate, log, and return True when early stopping says to stop."""
        if self.datasets.get("valid") is None:  # nothing to evaluate: log no NaN records
            return False
        loss = self.evaluate()
        result.valid_losses.append((self.step, loss))
        ppl = float(torch.tensor(loss).exp()) if loss == loss else float("nan")
        self.metrics.log(
            {"step": self.step, "valid_loss": loss, "valid_ppl": ppl},
            console=f"eval step {self.step:>6} | valid loss {loss:.4f} | valid ppl {ppl:,.2f}",
        )
        if loss < self.best_valid:
            self.best_valid, self.evals_without_improvement = loss, 0
        else:
            self.evals_without_improvement += 1
        patience = self.cfg.training.early_stopping_patience
        return patience > 0 and self.evals_without_improvement >= patience

    def run(self) -> TrainResult:
        """Train to ``training.train_steps`` (or until stopped), holding the run directory's lock throughout."""
        try:
            with StopRequest(self.topology) as stop:
                return self._run(stop)
        except Exception as e:
            self.rank_log.write_line(f"error: {first_line(e)}")
            lost = explain_lost_peer(e, self.hosts, self.hosts[self.topology.rank], self.cfg.parallel.timeout_s)
            if lost is not None:
                self.rank_log.write_line(f"error: {lost}")
                raise lost from e
            raise
        finally:
            for lock in self.locks:
                lock.release()

    def _run(self, signalled: StopRequest) -> TrainResult:
        cfg, t, topo = self.cfg, self.cfg.training, self.topology
        result = TrainResult(run_dir=self.run_dir)
        loader = GlobalBatchLoader(
            self.datasets["train"],
            self.global_batch,
            t.micro_batch_size,
            topo.dp_rank,
            topo.dp,
            self.consumed_samples,
            prefetch=cfg.data.prefetch,
            pin_memory=topo.device.type == "cuda",
        )
        batches = iter(loader)
        tokens_per_step = self.global_batch * cfg.data.seq_len
        if t.eval_interval and self.step == 0:
            self._record_eval(result)
        saved_at = None
        window_time = window_wait = 0.0
        window_steps = 0
        if 0 < t.early_stopping_patience <= self.evals_without_improvement:  # restarted after stopping early
            self.log(f"early stopping: already stopped (no improvement in {t.early_stopping_patience} evaluations)")
            result.stopped_early = True
        while self.step < t.train_steps and not result.stopped_early:
            start = time.perf_counter()
            microbatches = next(batches)
            got_data = time.perf_counter()
            metrics = self.engine.train_step(microbatches, lr_at(self.step, cfg.schedule, cfg.optimizer, t.train_steps))
            self.step += 1
            self.consumed_samples += self.global_batch
            if topo.device.type == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
            window_time += end - start
            window_wait += got_data - start
            window_steps += 1
            pause_point("step", self.step, topo.is_main)
            result.losses.append(metrics.loss)
            result.steps.append(self.step)
            if event := self.health.check(self.step, metrics.loss, metrics.grad_norm, metrics.skipped):
                self.metrics.log({"step": self.step, "event": event[0], "message": event[1]}, console=event[1])
            if self.step % cfg.logging.log_interval == 0 or self.step == t.train_steps:
                # the slowest rank sets the pace of a synchronous step: one all-reduce per log interval, not per step
                slowest, waited, memory = max_over_ranks(
                    [window_time, window_wait, float(peak_memory_bytes(topo.device))], topo.device, topo.is_distributed
                )
                tps = window_steps * tokens_per_step / slowest
                achieved = tps * self.flops_per_token / topo.world_size
                record = {
                    "step": self.step,
                    "loss": metrics.loss,
                    "lr": metrics.lr,
                    "grad_norm": metrics.grad_norm,
                    "tokens_per_s": tps,
                    "step_time_s": slowest / window_steps,
                    "mfu": achieved / self.peak_flops if self.peak_flops else None,
                    "memory_gib": memory / 2**30,
                    "data_wait": waited / slowest,
                    "consumed_samples": self.consumed_samples,
                    "skipped": metrics.skipped,
                    **metrics.extra,
                }
                self.metrics.log(record, console=format_train_line(record, t.train_steps))
                window_time = window_wait = 0.0
                window_steps = 0
            stop = False
            if t.eval_interval and self.step % t.eval_interval == 0:
                stop = self._record_eval(result)
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                result.checkpoint, saved_at = self.save(), self.step
            if stop:
                self.log(f"early stopping: no validation improvement in {t.early_stopping_patience} evaluations")
                result.stopped_early = True
                break
            if signalled.agreed():  # every rank stops after the same step (one tiny all-reduce per step)
                result.stopped_by = signalled.name
                self.log(f"{signalled.name}: stopping after step {self.step}, saving a checkpoint first")
                break
        evaluated_now = bool(result.valid_losses) and result.valid_losses[-1][0] == self.step
        if result.steps and not evaluated_now and self.datasets.get("valid") is not None and not result.stopped_by:
            self._record_eval(result)
        if saved_at != self.step and result.steps:
            result.checkpoint = self.save()
        elif result.checkpoint is None:
            result.checkpoint = find_latest(self.ckpt_root)
        result.final_step = self.step
        self.metrics.close()
        self.log(f"done: step {self.step}; checkpoint {result.checkpoint}; metrics {self.run_dir / 'metrics.jsonl'}")
        return result


def _flops_per_token(cfg: Config) -> float:
    from megatron_lite.planning.flops import training_flops_per_token

    return training_flops_per_token(cfg.model, cfg.data.seq_len, causal=False, data=cfg.data)


def train(cfg: Config, log: Callable[[str], None] = print) -> TrainResult:
    """Build everything from ``cfg`` and train; resumes from ``<checkpoint.dir>/latest`` when it exists."""
    return Trainer(cfg, log).run()
