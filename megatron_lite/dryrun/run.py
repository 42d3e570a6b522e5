"""A dry run: a config at its real world size, checked and built rank by rank in one CPU process, before it queues.

The layout goes through training's own rules (``rules.check_layout``, as a launch on GPUs would), then each class of
rank is built as training builds it (``simulate.py``), the most loaded one traces a step (``trace.py``), and the
planner's estimate for the same layout stands beside the counts. It fits when the most loaded rank's model states and
the device's fixed overhead, with the higher of the step's two traced peaks (the backward's: gathered parameters,
activations and temporaries; the optimizer step's: its temporaries), fit the named GPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from megatron_lite import rules
from megatron_lite.config import Config
from megatron_lite.dryrun.simulate import RankHoldings, fake_rank, rank_classes, simulate
from megatron_lite.errors import ConfigError
from megatron_lite.planning.hardware import device_memory, known_devices

OVERHEAD_BYTES = 1 << 30  # CUDA context, cuBLAS and NCCL workspaces (the planner's figure)
GIB = 2**30


@dataclass
class DryRunReport:
    world: int
    layout: dict
    ranks: list[RankHoldings]
    worst_rank: int
    gpu: str
    gpu_memory: int
    planner: dict | None = None  # the planner's estimate for the same layout (planning.memory.estimate)
    trace_error: str | None = None  # why the worst rank's step could not be traced
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def worst(self) -> RankHoldings:
        return next(r for r in self.ranks if r.rank == self.worst_rank)

    def peak_bytes(self, rank: RankHoldings | None = None) -> int:
        """Model states + the fixed overhead + the higher of the two phases' peaks: the backward's (gathered
        parameters, traced activations and temporaries) and the optimizer step's (its traced temporaries)."""
        r = rank or self.worst()
        traced = r.traced or {}
        backward = r.gathered_bytes + traced.get("activations", 0) + traced.get("temporaries", 0)
        return r.state_bytes + max(backward, traced.get("step_temporaries", 0)) + OVERHEAD_BYTES

    @property
    def fits(self) -> bool:
        return self.peak_bytes() <= self.gpu_memory

    def to_json(self) -> dict:
        ranks = [{"rank": r.rank, "coords": r.coords, "params": r.params, "param_bytes": r.param_bytes,
                  "grad_bytes": r.grad_bytes, "optimizer_bytes": r.optimizer_bytes,
                  "gathered_bytes": r.gathered_bytes, "blocks": r.blocks,
                  "traced_peak_bytes": (r.traced or {}).get("total"), "traced": r.traced} for r in self.ranks]
        return {"world": self.world, "layout": self.layout, "ranks": ranks, "worst_rank": self.worst_rank,
                "peak_bytes": self.peak_bytes(), "gpu": self.gpu, "gpu_memory": self.gpu_memory, "fits": self.fits,
                "planner": self.planner, "trace_error": self.trace_error, "seconds": self.seconds,
                "notes": self.notes}

    def planner_stage(self, rank: RankHoldings) -> dict | None:
        if not self.planner or "stages" not in self.planner:
            return None
        return self.planner["stages"][rank.coords["pp"]]

    def table(self) -> str:
        def gib(b: int | None) -> str:
            return "-" if b is None else f"{b / GIB:.2f}"

        head = (f"{'rank':>6} {'pp':>3} {'dp':>4} {'cp':>3} {'tp':>3} {'params':>13} {'weights':>8} {'grads':>8} {'optim':>8} "
                f"{'gathered':>8} {'traced':>8} | {'planner w/g/o GiB':>20}")
        lines = [head, "-" * len(head)]
        for r in self.ranks:
            st = self.planner_stage(r)
            plan = "-" if st is None else "/".join(gib(st["breakdown"][k]) for k in ("weights", "gradients",
                                                                                     "optimizer"))
            mark = " <- most loaded" if r.rank == self.worst_rank else ""
            lines.append(f"{r.rank:>6} {r.coords['pp']:>3} {r.coords['dp']:>4} {r.coords.get('cp', 0):>3} "
                         f"{r.coords['tp']:>3} {r.params:>13,} "
                         f"{gib(r.param_bytes):>8} {gib(r.grad_bytes):>8} {gib(r.optimizer_bytes):>8} "
                         f"{gib(r.gathered_bytes):>8} {gib((r.traced or {}).get('total')):>8} | {plan:>20}{mark}")
        w = self.worst()
        traced = w.traced or {}
        step = traced.get("step_temporaries")
        lines.append(f"most loaded rank {w.rank}: states {gib(w.state_bytes)} GiB + overhead {gib(OVERHEAD_BYTES)} + "
                     f"backward's peak (gathered {gib(w.gathered_bytes)} + traced activations "
                     f"{gib(traced.get('activations', 0))} + temporaries {gib(traced.get('temporaries', 0))})"
                     + ("" if step is None else f" or the optimizer step's (temporaries {gib(step)}), the higher")
                     + f" = {gib(self.peak_bytes())} GiB of {self.gpu}'s {gib(self.gpu_memory)} GiB")
        if self.planner and "error" in self.planner:
            lines.append(f"planner: {self.planner['error']}")
        elif self.planner:
            lines.append(f"planner: {gib(self.planner['per_gpu_bytes'])} GiB per GPU (stage "
                         f"{self.planner['most_loaded_stage']}, {self.planner['peak_phase']} peak)")
        if self.trace_error:
            lines.append(f"not traced: {self.trace_error}")
        lines += self.notes
        return "\n".join(lines)


def planner_layout(cfg: Config, world: int):
    """The planner's layout for a training config at ``world`` ranks (DDP and single hold what ZeRO-0 in fp32 holds:
    fp32 weights, gradients and AdamW states)."""
    from megatron_lite.planning.layout import Layout

    par, t = cfg.parallel, cfg.training
    torch_engine = par.engine in ("single", "ddp", "auto")
    offload = "params" if par.fsdp_cpu_offload or par.offload_params else "optimizer" if par.offload_optimizer else None
    return Layout(gpus=world, tp=par.tp, pp=par.pp, engine="fsdp" if par.engine == "fsdp" else "deepspeed",
                  dp_replicate=par.dp_replicate, cp=par.cp, ep=par.ep,
                  zero=par.zero_stage, offload=offload, micro_batch=t.micro_batch_size, seq_len=cfg.data.seq_len,
                  target_len=cfg.data.target_seq_len, global_batch=cfg.global_batch_size,
                  recompute="full" if cfg.model.activation_checkpointing else "none", schedule=par.pp_schedule,
                  virtual_stages=par.pp_virtual_stages, dtype="fp32" if torch_engine else t.precision,
                  sequence_parallel=par.sequence_parallel)


def dry_run(cfg: Config, world: int, ranks: str | list[int] = "classes", gpu: str = "h100", trace: bool = True,
            log: Callable[[str], None] = lambda _: None) -> DryRunReport:
    """Check, build and measure ``cfg`` at ``world`` ranks (see the module docstring). A layout the rules refuse
    raises their ``ConfigError``."""
    start = time.perf_counter()
    memory = device_memory(gpu)
    if memory is None:
        raise ConfigError(f"--gpu {gpu}: unknown device (known: {', '.join(known_devices())})")
    name = rules.check_layout(cfg, world, "cuda")
    if ranks == "classes":
        chosen = rank_classes(cfg, world)
    elif ranks == "all":
        chosen = list(range(world))
    else:
        chosen = sorted(set(ranks))
        if any(not 0 <= r < world for r in chosen):
            raise ConfigError(f"--dry-run-ranks {chosen}: ranks are 0..{world - 1}")
    held = []
    for r in chosen:
        with fake_rank(r, world):
            held.append(simulate(cfg, world, r)[0])
        log(f"rank {r}: {held[-1].params:,} parameters")
    worst = max(held, key=lambda h: (h.state_bytes + h.gathered_bytes, -h.rank))
    layout = {"engine": name, "world": world, "pp": cfg.parallel.pp, "tp": cfg.parallel.tp, "cp": cfg.parallel.cp,
              "dp": world // (cfg.parallel.pp * cfg.parallel.tp * cfg.parallel.cp),
              "dp_replicate": cfg.parallel.dp_replicate,
              "zero_stage": cfg.parallel.zero_stage, "precision": cfg.training.precision,
              "micro_batch_size": cfg.training.micro_batch_size, "seq_len": cfg.data.seq_len,
              "sequence_parallel": cfg.parallel.sequence_parallel, "pp_schedule": cfg.parallel.pp_schedule,
              "activation_checkpointing": cfg.model.activation_checkpointing}
    report = DryRunReport(world, layout, held, worst.rank, gpu, memory)
    if name == "deepspeed":
        report.notes.append("DeepSpeed cannot build on the meta device: its bytes follow ZeRO's partition rules over "
                            "the rank's real tensors and optimizer groups, and its step is traced without them")
    if trace:
        try:
            from megatron_lite.dryrun.trace import trace_step

            with fake_rank(worst.rank, world):
                _, topology, built = simulate(cfg, world, worst.rank)
                worst.traced = trace_step(cfg, topology, built)
            report.notes.append("traced on CPU kernels: a fused GPU attention kernel (flash) keeps less")
        except Exception as e:  # a trace that cannot run is reported, not fatal: the counts above stand
            report.trace_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    report.planner = _planner(cfg, world, memory)
    report.seconds = time.perf_counter() - start
    return report


def _planner(cfg: Config, world: int, memory: int) -> dict | None:
    from megatron_lite.planning.errors import PlanError
    from megatron_lite.planning.memory import estimate

    try:
        return estimate(cfg.model, planner_layout(cfg, world), memory)
    except (PlanError, ValueError) as e:
        return {"error": str(e)}


def write_json(report: DryRunReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                  else str(o))
