"""The layout-parity harness: run one config under several parallel layouts and compare each with one process.

Every layout trains on the same global batches (data is a function of the global sample index, not of the layout)
and starts from the same weights (initial values by name), so in fp32 a correct layout matches the single-process
run up to reduction order. Each layout runs in forked child processes with its own rendezvous port
(``ranks.py``), first through the frozen-weights pass (``frozen.py``: gradients of every tensor at the initial
weights, step by step), then through the training loop a user runs. ``report.py`` says what is compared.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_lite.parity.frozen import GradientCheck, frozen_pass
from megatron_lite.parity.gradients import TensorDiff, coverage_gaps, read_reference
from megatron_lite.parity.layouts import Layout, parse_layout
from megatron_lite.parity.ranks import preload, run_ranks
from megatron_lite.parity.report import ParityReport
from megatron_lite.parity.structure import check_structure

DEFAULT_LAYOUTS = ("single", "ddp2", "zero1", "zero2", "zero3", "zero3-offload", "fsdp2", "hsdp2x2")
EXPERT_LAYOUTS = ("ep2", "fsdp2-ep2")  # joined to the default set for mixture-of-experts models
DEFAULT_GRAD_STEPS = 4  # frozen steps: the first step's batch and three more, each at the initial weights


def _train_rank(rank: int, config: str | None, overrides: list[str], out: str, check: GradientCheck | None) -> None:
    """One rank of a layout: report what it built, run the frozen pass when asked, then train; every rank writes
    ``rank<r>.json`` under ``out``, and rank 0 also the per-step metrics (``result.json``)."""
    from megatron_lite.config import load_config
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, log=lambda *_: None)
    mine = {"holdings": trainer.engine.holdings()}
    if check is not None and check.steps:
        mine["frozen"] = frozen_pass(trainer, check, rank)
    result = trainer.run()
    Path(out, f"rank{rank}.json").write_text(json.dumps(mine))
    if rank == 0:
        metrics = Path(cfg.logging.run_dir) / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        norms = {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r}
        grad_norms = [norms.get(step, float("nan")) for step in result.steps]
        speed = {r["step"]: (r["tokens_per_s"], r["memory_gib"]) for r in records if "tokens_per_s" in r}
        Path(out, "result.json").write_text(json.dumps({
            "losses": result.losses,
            "grad_norms": grad_norms,
            "tokens_per_s": [speed.get(step, (float("nan"), 0.0))[0] for step in result.steps],
            "memory_gib": [speed.get(step, (0.0, float("nan")))[1] for step in result.steps],
            "records": [r for r in records if "tokens_per_s" in r],
        }))


@dataclass
class LayoutRun:
    """One run: rank 0's train loss and gradient norm (before clipping) of each step, and every rank's report."""

    losses: list[float]
    grad_norms: list[float]
    tokens_per_s: list[float] = field(default_factory=list)  # global tokens/s of each step (log interval 1)
    memory_gib: list[float] = field(default_factory=list)  # peak memory after each step, the maximum over ranks
    records: list[dict] = field(default_factory=list)  # the train records of metrics.jsonl (rank 0 writes them)
    holdings: list[dict] = field(default_factory=list)  # per rank: what it built (Engine.holdings)
    frozen: list[dict] = field(default_factory=list)  # per rank: the frozen pass's losses, norms and tensor diffs

    def tensor_diffs(self) -> list[list[TensorDiff]]:
        """Per frozen step, every rank's piece of every gradient against the reference."""
        steps = max((len(f["tensors"]) for f in self.frozen), default=0)
        return [[TensorDiff.from_json(d) for f in self.frozen for d in f["tensors"][k]] for k in range(steps)]


def run_layout(
    layout: Layout | str,
    config: str | None,
    overrides: list[str] = (),
    timeout: float = 600.0,
    workdir: str | None = None,
    quiet: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    check: GradientCheck | None = None,
) -> LayoutRun:
    """Train ``config`` (plus ``overrides``) under ``layout`` in forked ranks and return its per-step metrics.

    Checkpoints go to a temporary directory that is removed afterwards, unless ``checkpoint_dir`` is given (then
    they are kept there and a run resumes from its ``latest``, as a user's run would). ``check`` runs the frozen pass
    first (``frozen.py``).
    """
    if isinstance(layout, str):
        layout = parse_layout(layout)
    preload([layout])
    with tempfile.TemporaryDirectory(prefix=f"parity-{layout.name}-", dir=workdir) as tmp:
        run_overrides = [
            *overrides,
            *layout.overrides,
            f"logging.run_dir={tmp}/run",
            f"checkpoint.dir={checkpoint_dir or f'{tmp}/checkpoints'}",
            f"checkpoint.resume={'true' if checkpoint_dir else 'false'}",
            "logging.wandb_mode=disabled",
            "logging.log_interval=1",
        ]
        args = (config, run_overrides, tmp, check)
        try:
            run_ranks(_train_rank, layout.world_size, args, timeout, log_dir=tmp if quiet else None)
        except TimeoutError:
            raise TimeoutError(f"layout {layout.name} did not finish within {timeout:.0f} s") from None
        data = json.loads(Path(tmp, "result.json").read_text())
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(layout.world_size)]
        return LayoutRun(data["losses"], data["grad_norms"], data["tokens_per_s"], data["memory_gib"],
                         data["records"], [r["holdings"] for r in ranks], [r["frozen"] for r in ranks if "frozen" in r])


def compare_layouts(
    config: str | None,
    layouts: list[str] = DEFAULT_LAYOUTS,
    steps: int = 4,
    overrides: list[str] = (),
    timeout: float = 600.0,
    log: Callable[[str], None] | None = None,
    quiet: bool = True,
    grad_steps: int | None = None,
    keep_pieces: str | None = None,
) -> ParityReport:
    """Run each layout for ``steps`` training steps, after ``grad_steps`` frozen steps (default: up to 4), ``single``
    first as the reference, and collect a ParityReport. ``keep_pieces``: a directory where each layout's ranks leave
    their gradient pieces of the first step (``<dir>/<layout>/rank<r>.safetensors``) and the reference gradients."""
    names = list(dict.fromkeys(["single", *layouts]))
    parsed = {n: parse_layout(n) for n in names}  # bad names fail before any run
    preload(list(parsed.values()))
    run_overrides = [*overrides, f"training.train_steps={steps}", "training.eval_interval=0"]
    frozen = min(DEFAULT_GRAD_STEPS if grad_steps is None else grad_steps, steps)
    report = ParityReport(steps, {}, {}, {})
    with tempfile.TemporaryDirectory(prefix="parity-reference-", dir=keep_pieces) as work:
        reference = Path(keep_pieces or work) / "reference.safetensors"
        for name in names:
            start = time.perf_counter()
            pieces = None
            if keep_pieces:
                pieces = Path(keep_pieces) / name
                pieces.mkdir(parents=True, exist_ok=True)
            is_ref = name == report.reference
            check = GradientCheck(frozen, None if is_ref or not reference.is_file() else str(reference),
                                  str(reference) if is_ref else None, str(pieces) if pieces else None)
            try:
                run = run_layout(parsed[name], config, run_overrides, timeout, quiet=quiet, check=check)
                _add_run(report, name, parsed[name], run, reference)
            except Exception as e:  # a failing layout is a result, not the end of the comparison
                report.errors[name] = _one_line(e)
            report.seconds[name] = time.perf_counter() - start
            if log:
                log(_status_line(report, name, parsed[name]))
    return report


def _add_run(report: ParityReport, name: str, layout: Layout, run: LayoutRun, reference: Path) -> None:
    report.losses[name], report.grad_norms[name] = run.losses, run.grad_norms
    report.structure[name] = check_structure(layout, run.holdings)
    report.holdings[name] = run.holdings
    if run.frozen:
        report.frozen_losses[name] = run.frozen[0]["losses"]
        report.frozen_norms[name] = run.frozen[0]["grad_norms"]
    if name != report.reference and run.frozen and reference.is_file():
        report.tensors[name] = run.tensor_diffs()
        shapes = {n: tuple(t.shape) for n, t in read_reference(reference)[0].items()}
        report.gaps[name] = coverage_gaps(shapes, report.tensors[name][0]) if report.tensors[name] else []


def _status_line(report: ParityReport, name: str, layout: Layout) -> str:
    head = f"{name:>16}: {layout.world_size} rank(s), {report.seconds[name]:5.1f} s, "
    if name in report.errors:
        return head + "failed: " + report.errors[name]
    if name == report.reference:
        return head + "the reference"
    return head + (f"max |loss diff| {report.max_abs_diff(name):.2e}, frozen |grad norm| rel "
                   f"{report.frozen_norm_diff(name):.2e}, worst tensor rel {report.max_tensor_diff(name):.2e}")


def _one_line(e: BaseException) -> str:
    """The most useful line of a (possibly child-process) exception."""
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # child tracebacks end with "ExcType: message"
        if re.match(r"^[\w.]+(Error|Exception)\b", ln.strip()):
            return ln.strip()
    return lines[-1] if lines else type(e).__name__
