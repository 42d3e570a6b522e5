"""Plot a run's training curves from its metrics.jsonl: loss (train and validation), learning rate and throughput.

    python tools/plot_metrics.py RUN_DIR [--output PNG]

Writes RUN_DIR/metrics.png unless --output says otherwise. Runs headless (matplotlib's Agg backend). A run that was
resumed appends to the same file and may log some steps twice; the record written last wins, which is the one the
resumed run continued from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class MetricsError(Exception):
    """The metrics file is missing, empty or unreadable; the message says which and where."""


def read_metrics(path: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Train and eval records keyed by step (the last record of a step wins)."""
    if not path.is_file():
        raise MetricsError(f"{path} not found (is this a run directory?)")
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsError(f"{path}:{n}: not a JSON record ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsError(f"{path}:{n}: expected a JSON object with an integer 'step'")
        if "loss" in record:
            train[record["step"]] = record
        if "valid_loss" in record:
            evals[record["step"]] = record
    if not train and not evals:
        raise MetricsError(f"{path} holds no metrics records")
    return train, evals


def _series(records: dict[int, dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps = sorted(s for s, r in records.items() if isinstance(r.get(key), (int, float)))
    return steps, [float(records[s][key]) for s in steps]


def plot(train: dict[int, dict[str, Any]], evals: dict[int, dict[str, Any]], output: Path, title: str) -> None:
    """Three stacked panels sharing the step axis, so a loss spike lines up with the LR and throughput at that step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(3, 1, figsize=(8, 9), sharex=True, constrained_layout=True)
    fig.suptitle(title)

    steps, loss = _series(train, "loss")
    if steps:
        ax_loss.plot(steps, loss, label="train", color="tab:blue", linewidth=1.2)
    steps, valid = _series(evals, "valid_loss")
    if steps:
        ax_loss.plot(steps, valid, label="validation", color="tab:orange", marker="o", markersize=4, linewidth=1.5)
    ax_loss.set_ylabel("loss (cross-entropy)")
    ax_loss.legend(loc="upper right")

    steps, lr = _series(train, "lr")
    ax_lr.plot(steps, lr, color="tab:green", linewidth=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    steps, tps = _series(train, "tokens_per_s")
    ax_tps.plot(steps, tps, color="tab:purple", linewidth=1.2)
    ax_tps.set_ylabel("throughput (tokens/s)")
    ax_tps.set_ylim(bottom=0)
    ax_tps.set_xlabel("optimizer step")

    for ax in (ax_loss, ax_lr, ax_tps):
        ax.grid(True, alpha=0.3)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl (logging.run_dir)")
    parser.add_argument("--output", type=Path, default=None, help="PNG to write (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    output = args.output or args.run_dir / "metrics.png"
    try:
        train, evals = read_metrics(args.run_dir / "metrics.jsonl")
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = f"{args.run_dir.resolve().name}: {len(train)} logged steps, {len(evals)} evaluations"
    plot(train, evals, output, title)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
