"""Layout parity: run one config under several parallel layouts and compare their per-step losses with one process.

Every layout trains on the same global batches (data is a function of the global sample index, not of the layout),
so in fp32 the losses of a correct layout match the single-process run up to reduction order, ~1e-6.

Layout names are dash-separated parts, read left to right:

    single            one process
    ddp<N>            DDP over N data-parallel ranks
    fsdp<N>           FSDP2 over N ranks
    hsdp<R>x<S>       FSDP2 as HSDP: R replica groups of S shards (R*S ranks)
    zero<K>           DeepSpeed ZeRO stage K over 2 data-parallel ranks (change with dp<N>)
    offload           with zero<K>: offload optimizer state and parameters (stage 3) to the CPU
    dp<N>             the data-parallel size, for engines named without one
    tp<N>, pp<N>      tensor / pipeline parallel sizes; may be fused, e.g. tp2pp2
    sp                with tp<N>: sequence parallelism
    gpipe, 1f1b,      with pp<N>: the pipeline schedule (default 1f1b); interleaved and zb (interleaved zero-bubble)
    interleaved, zb   run v<N> stages per rank (default 2)
    v<N>              virtual stages per pipeline rank

e.g. ``ddp2``, ``zero3-offload``, ``hsdp2x2``, ``zero1-tp2`` (4 ranks), ``tp2-sp`` (2 ranks), ``fsdp2-tp2``,
``pp2-interleaved-v2``, ``fsdp2-pp2-1f1b`` (4 ranks), ``tp2pp2-1f1b``.
The world size is dp x tp x pp. Each layout runs in forked child processes with its own rendezvous port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_lite.config import ConfigError

DEFAULT_LAYOUTS = ("single", "ddp2", "zero1", "zero2", "zero3", "zero3-offload", "fsdp2", "hsdp2x2")
ZERO_DEFAULT_DP = 2


@dataclass
class Layout:
    """A named layout: how many ranks it needs and the config overrides that select it."""

    name: str
    world_size: int
    overrides: list[str] = field(default_factory=list)


def parse_layout(name: str) -> Layout:
    """Turn a layout name (see the module docstring) into a world size and config overrides."""
    engine, dp, dp_replicate, tp, pp = None, None, 1, 1, 1
    stage, offload, sequence_parallel = None, False, False
    schedule, virtual = "1f1b", 2
    for part in name.lower().split("-"):
        if part == "single":
            engine, dp = "single", 1
        elif m := re.fullmatch(r"(ddp|fsdp)(\d+)", part):
            engine, dp = m.group(1), int(m.group(2))
        elif m := re.fullmatch(r"hsdp(\d+)x(\d+)", part):
            engine, dp_replicate, dp = "fsdp", int(m.group(1)), int(m.group(1)) * int(m.group(2))
        elif m := re.fullmatch(r"zero([0-3])", part):
            engine, stage = "deepspeed", int(m.group(1))
        elif part == "offload":
            offload = True
        elif part == "sp":
            sequence_parallel = True
        elif part in ("gpipe", "1f1b", "interleaved", "zb"):
            schedule = part
        elif m := re.fullmatch(r"v(\d+)", part):
            virtual = int(m.group(1))
        elif re.fullmatch(r"((dp|tp|pp)\d+)+", part):
            for axis, size in re.findall(r"(dp|tp|pp)(\d+)", part):
                if axis == "dp":
                    dp = int(size)
                elif axis == "tp":
                    tp = int(size)
                else:
                    pp = int(size)
        else:
            raise ConfigError(
                f"layout '{name}': unknown part '{part}' (expected single, ddp<N>, fsdp<N>, hsdp<R>x<S>, zero<K>, "
                "offload, dp<N>, tp<N>, pp<N>, sp, gpipe, 1f1b, interleaved, zb, v<N>)"
            )
    if dp is None:
        dp = ZERO_DEFAULT_DP if engine == "deepspeed" else 1
    world = dp * tp * pp
    if engine is None:
        engine = "single" if world == 1 else "ddp"
    if engine == "single" and world > 1:
        raise ConfigError(f"layout '{name}': 'single' is one process, but tp x pp x dp = {world}")
    if offload and engine not in ("deepspeed", "fsdp"):
        raise ConfigError(f"layout '{name}': 'offload' needs zero<K> or fsdp<N>")
    if sequence_parallel and tp == 1:
        raise ConfigError(f"layout '{name}': 'sp' needs tp<N> with N > 1")
    # a layout sets every parallel key, so whatever the config file chose cannot leak into it
    overrides = [
        f"parallel.engine={engine}",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.sequence_parallel={str(sequence_parallel).lower()}",
        f"parallel.pp_schedule={schedule}",
        f"parallel.pp_virtual_stages={virtual}",
        f"parallel.dp_replicate={dp_replicate}",
        f"parallel.zero_stage={stage or 0}",
        f"parallel.offload_optimizer={str(offload and engine == 'deepspeed').lower()}",
        f"parallel.offload_params={str(offload and stage == 3).lower()}",
        f"parallel.fsdp_cpu_offload={str(offload and engine == 'fsdp').lower()}",
    ]
    return Layout(name, world, overrides)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preload(layouts: list[Layout]) -> None:
    """Import what the ranks need once, in this process: forked children inherit it instead of each paying seconds.

    (Building the model on the meta device imports torch._dynamo, ~3 s; DeepSpeed takes ~2 s.)
    """
    import torch._dynamo  # noqa: F401

    import megatron_lite.training.trainer  # noqa: F401

    if any("parallel.engine=deepspeed" in layout.overrides for layout in layouts):
        import torch

        from megatron_lite.engines.deepspeed import import_deepspeed

        import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _rank_main(rank: int, world: int, port: int, target: Callable, args: tuple, log_dir: str | None) -> None:
    """One forked rank: the launcher's environment variables, then ``target(rank, *args)``, then a clean exit."""
    import torch

    torch.set_num_threads(1)  # forked after the parent ran torch ops: OpenMP with >1 thread would hang
    if log_dir:  # each rank's output goes to a file; errors still reach the parent
        log = os.open(os.path.join(log_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch.distributed as dist

    try:
        target(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: Callable, world: int, args: tuple = (), timeout: float = 600.0, log_dir: str | None = None) -> None:
    """Run ``target(rank, *args)`` in ``world`` forked processes set up as a launcher would (rank variables and a
    free rendezvous port on this machine), and wait for all of them; a rank's failure raises here.

    Forking costs milliseconds where a launcher costs seconds, so tests and benchmarks run many small layouts this way.
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _rank_main, args=(world, free_port(), target, args, log_dir), nprocs=world, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} rank(s) did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _train_rank(rank: int, config: str | None, overrides: list[str], out: str) -> None:
    """One rank of a layout: train and, on rank 0, write the per-step losses and gradient norms to ``out``."""
    from megatron_lite.config import load_config
    from megatron_lite.training.trainer import train

    cfg = load_config(config, overrides)
    result = train(cfg, log=lambda *_: None)
    if rank == 0:
        metrics = Path(cfg.logging.run_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        norms = {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r}
        grad_norms = [norms.get(step, float("nan")) for step in result.steps]
        speed = {r["step"]: (r["tokens_per_s"], r["memory_gib"]) for r in records if "tokens_per_s" in r}
        Path(out).write_text(json.dumps({
            "losses": result.losses,
            "grad_norms": grad_norms,
            "tokens_per_s": [speed.get(step, (float("nan"), 0.0))[0] for step in result.steps],
            "memory_gib": [speed.get(step, (0.0, float("nan")))[1] for step in result.steps],
            "records": [r for r in records if "tokens_per_s" in r],
        }))


@dataclass
class LayoutRun:
    """Rank 0's view of one run: the train loss and the gradient norm (before clipping) of each step."""

    losses: list[float]
    grad_norms: list[float]
    tokens_per_s: list[float] = field(default_factory=list)  # global tokens/s of each step (log interval 1)
    memory_gib: list[float] = field(default_factory=list)  # peak memory after each step, the maximum over ranks
    records: list[dict] = field(default_factory=list)  # the train records of metrics.jsonl (rank 0 writes them)


def run_layout(
    layout: Layout | str,
    config: str | None,
    overrides: list[str] = (),
    timeout: float = 600.0,
    workdir: str | None = None,
    quiet: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> LayoutRun:
    """Train ``config`` (plus ``overrides``) under ``layout`` in forked ranks and return rank 0's per-step metrics.

    Checkpoints go to a temporary directory that is removed afterwards, unless ``checkpoint_dir`` is given (then
    they are kept there and a run resumes from its ``latest``, as a user's run would).
    """
    if isinstance(layout, str):
        layout = parse_layout(layout)
    preload([layout])
    with tempfile.TemporaryDirectory(prefix=f"parity-{layout.name}-", dir=workdir) as tmp:
        out = os.path.join(tmp, "result.json")
        run_overrides = [
            *overrides,
            *layout.overrides,
            f"logging.run_dir={tmp}/run",
            f"checkpoint.dir={checkpoint_dir or f'{tmp}/checkpoints'}",
            f"checkpoint.resume={'true' if checkpoint_dir else 'false'}",
            "logging.wandb_mode=disabled",
            "logging.log_interval=1",
        ]
        args = (config, run_overrides, out)
        try:
            run_ranks(_train_rank, layout.world_size, args, timeout, log_dir=tmp if quiet else None)
        except TimeoutError:
            raise TimeoutError(f"layout {layout.name} did not finish within {timeout:.0f} s") from None
        data = json.loads(Path(out).read_text())
        return LayoutRun(data["losses"], data["grad_norms"], data["tokens_per_s"], data["memory_gib"], data["records"])


def _max_abs_diff(ref: list[float] | None, got: list[float] | None) -> float:
    if ref is None or got is None or len(ref) != len(got):
        return float("inf")
    return max((abs(a - b) if a == a and b == b else float("inf") for a, b in zip(ref, got)), default=0.0)


@dataclass
class ParityReport:
    """Per-step losses and gradient norms per layout, compared with the reference, and the layouts that failed."""

    steps: int
    losses: dict[str, list[float]]
    errors: dict[str, str]
    seconds: dict[str, float]
    grad_norms: dict[str, list[float]] = field(default_factory=dict)
    reference: str = "single"

    def max_abs_diff(self, name: str) -> float:
        """Largest |loss - reference loss| over the steps."""
        return _max_abs_diff(self.losses.get(self.reference), self.losses.get(name))

    def max_grad_norm_diff(self, name: str) -> float:
        """Largest |grad norm - reference grad norm| over the steps (catches double clipping or scaling)."""
        return _max_abs_diff(self.grad_norms.get(self.reference), self.grad_norms.get(name))

    def failures(self, tolerance: float) -> list[str]:
        """Layouts that failed to run, or whose loss or gradient norm left the tolerance at some step."""
        bad = list(self.errors)
        for n in self.losses:
            if n == self.reference:
                continue
            ref_norm = max((abs(x) for x in self.grad_norms.get(self.reference, [])), default=1.0)
            if self.max_abs_diff(n) > tolerance or self.max_grad_norm_diff(n) > tolerance * max(1.0, ref_norm):
                bad.append(n)
        return bad

    def table(self) -> str:
        names = list(self.losses) + [n for n in self.errors if n not in self.losses]
        width = max(14, *(len(n) + 2 for n in names))

        def row(label: str, cell: Callable[[str], str]) -> str:
            return f"{label:<5}" + "".join(f"{cell(n):>{width}}" for n in names)

        lines = [row("step", lambda n: n)]
        for i in range(self.steps):
            got = self.losses
            lines.append(row(f"{i + 1:>4}", lambda n: f"{got[n][i]:.6f}" if n in got and i < len(got[n]) else "-"))
        lines.append(row("loss|", lambda n: f"{self.max_abs_diff(n):.2e}" if n in self.losses else "FAILED"))
        lines.append(row("norm|", lambda n: f"{self.max_grad_norm_diff(n):.2e}" if n in self.grad_norms else "-"))
        lines.append(row("sec", lambda n: f"{self.seconds.get(n, 0.0):.1f}"))
        lines.append("(loss| and norm|: largest difference from single over the steps, of the loss and of the gradient "
                     "norm before clipping)")
        for n, e in self.errors.items():
            lines.append(f"{n}: {e}")
        return "\n".join(lines)


def compare_layouts(
    config: str | None,
    layouts: list[str] = DEFAULT_LAYOUTS,
    steps: int = 4,
    overrides: list[str] = (),
    timeout: float = 600.0,
    log: Callable[[str], None] | None = None,
    quiet: bool = True,
) -> ParityReport:
    """Run each layout for ``steps`` steps (``single`` first, as the reference) and collect a ParityReport."""
    names = list(dict.fromkeys(["single", *layouts]))
    parsed = {n: parse_layout(n) for n in names}  # bad names fail before any run
    preload(list(parsed.values()))
    run_overrides = [*overrides, f"training.train_steps={steps}", "training.eval_interval=0"]
    report = ParityReport(steps, {}, {}, {})
    for name in names:
        start = time.perf_counter()
        try:
            run = run_layout(parsed[name], config, run_overrides, timeout, quiet=quiet)
            report.losses[name], report.grad_norms[name] = run.losses, run.grad_norms
        except Exception as e:  # a failing layout is a result, not the end of the comparison
            report.errors[name] = _one_line(e)
        report.seconds[name] = time.perf_counter() - start
        if log:
            if name in report.errors:
                status = "failed: " + report.errors[name]
            else:
                status = (f"max |loss diff| {report.max_abs_diff(name):.2e}, "
                          f"|grad norm diff| {report.max_grad_norm_diff(name):.2e}")
            log(f"{name:>16}: {parsed[name].world_size} rank(s), {report.seconds[name]:5.1f} s, {status}")
    return report


def _one_line(e: BaseException) -> str:
    """The most useful line of a (possibly child-process) exception."""
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # child tracebacks end with "ExcType: message"
        if re.match(r"^[\w.]+(Error|Exception)\b", ln.strip()):
            return ln.strip()
    return lines[-1] if lines else type(e).__name__
