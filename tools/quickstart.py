#!/usr/bin/env python
"""The whole pipeline on one CPU machine with no internet, in a few minutes.

1. Collects text that every Python installation has: the standard library's docstrings (walked with ``ast``).
2. Trains a byte-level BPE tokenizer on it (tools/train_tokenizer.py).
3. Tokenizes it into Megatron-compatible shards (tools/preprocess_data.py).
4. Trains a small GPT with 2 data-parallel ranks (``deepspeed --num_gpus 2 launch/pretrain.py``, on CPU),
   printing loss, tokens/s and where the checkpoint and metrics went.

    python tools/quickstart.py                         # everything, under runs/quickstart
    python tools/quickstart.py --ranks 1               # one process, no launcher
    python tools/quickstart.py --launcher torchrun     # torchrun instead of the deepspeed launcher

Steps whose outputs already exist are reused; training resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collect_docstrings(out_file: Path) -> int:
    """Write every docstring of the standard library as one JSONL document; return the count."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    tmp = out_file.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for path in sorted(stdlib.rglob("*.py")):
            if "site-packages" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        f.write(json.dumps({"text": doc}) + "\n")
                        count += 1
    os.replace(tmp, out_file)
    return count


class QuickstartError(Exception):
    """A step that cannot run or that failed: printed as one line, exit status 2 (or the step's own status)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode:
        script = next((c for c in cmd if c.endswith(".py")), cmd[0])
        raise QuickstartError(f"{script} failed with exit status {result.returncode} (its output is above)",
                              result.returncode)


def find_launcher(name: str) -> str:
    """A launcher script installed beside this interpreter (a venv's python run without activating the venv), else
    on PATH; a one-line error saying what to do when neither has it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise QuickstartError(
        f"the {name} launcher is neither beside {sys.executable} nor on PATH: install it into this environment "
        f"(pip install {name}), or use --launcher torchrun, or --ranks 1"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="directory for corpus, tokenizer, shards and the run")
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks on this machine (default 2)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides, e.g. training.train_steps=100")
    a = p.parse_args(argv)
    if a.ranks < 1:
        p.error(f"--ranks={a.ranks} must be at least 1")
    try:
        return _pipeline(a)
    except QuickstartError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status


def _pipeline(a: argparse.Namespace) -> int:
    py = sys.executable
    if a.ranks == 1:  # found before anything is written: a missing launcher costs nothing
        launch = [py]
    elif a.launcher == "deepspeed":
        launch = [find_launcher("deepspeed"), "--num_gpus", str(a.ranks)]
    else:
        launch = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(a.ranks)]
    out = (ROOT / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    started = time.time()
    corpus = out / "corpus" / "stdlib_docstrings.jsonl"
    tokenizer = out / "tokenizer" / "tokenizer.json"
    prefix = out / "data" / "stdlib_docstrings"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        n = collect_docstrings(corpus)
        print(f"[1/4] collected {n:,} docstrings ({corpus.stat().st_size / 1e6:.1f} MB) -> {corpus}", flush=True)
    else:
        print(f"[1/4] corpus exists: {corpus}")
    if not tokenizer.exists():
        print("[2/4] training the tokenizer", flush=True)
        run([py, "tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", str(a.vocab_size),
             "--output", str(tokenizer.parent)])
    else:
        print(f"[2/4] tokenizer exists: {tokenizer}")
    if not prefix.with_suffix(".idx").exists():
        print("[3/4] tokenizing into shards", flush=True)
        run([py, "tools/preprocess_data.py", "--input", str(corpus), "--tokenizer", str(tokenizer),
             "--output-prefix", str(prefix), "--workers", "2", "--append-eod", "--no-progress"])
    else:
        print(f"[3/4] shards exist: {prefix}.bin/.idx")

    overrides = [
        f"data.prefixes={prefix}",
        f"data.tokenizer={tokenizer}",
        f"model.vocab_size={a.vocab_size}",
        f"logging.run_dir={out / 'run'}",
        *a.overrides,
    ]
    # the interpreter's own bin directory first, so a launcher finds the same environment's tools and python
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if a.ranks > 1 else "2"),
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1", PATH=path)
    cmd = [*launch, "launch/pretrain.py", "--config", a.config, *overrides]
    print(f"[4/4] training with {a.ranks} rank(s)", flush=True)
    run(cmd, env=env)
    summarize(out / "run", time.time() - started)
    return 0


def summarize(run_dir: Path, seconds: float) -> None:
    """Print how far the validation loss fell and where the outputs are."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    if len(valid) >= 2:
        print(f"validation loss {valid[0]:.3f} -> {valid[-1]:.3f} ({100 * (valid[-1] / valid[0] - 1):+.1f}%)")
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        print(f"checkpoint: {run_dir / 'checkpoints' / latest.read_text().strip()}")
    print(f"metrics: {run_dir / 'metrics.jsonl'} (plot: python tools/plot_metrics.py {run_dir})")
    print(f"quickstart finished in {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
