"""The bad-input catalogue: each mistake a user can make, run as the user runs it (a subprocess of the entry point or
the tool), fails with exit status 2 and one line on stderr naming the file, key or value and what was expected, with
no traceback unless ``--debug`` is given, and changes nothing that was already on disk.

Most cases fail while the config and the data files are checked, before torch is imported (a fraction of a second
each); the ones that need a model, an engine or a process group cost a few seconds. Engine and layout refusals in
depth (each engine setting the engines refuse) are in tests/engines/test_bad_inputs.py, in-process.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}


def _write_corpus(prefix: Path, n_docs: int) -> None:
    from megatron_lite.data import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for _ in range(n_docs):
            w.add_document(rng.integers(0, VOCAB, int(rng.integers(8, 80))))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace of good and bad inputs: shards, a tokenizer, a checkpoint, configs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megatron_lite.config import load_config
    from megatron_lite.training.trainer import train

    ws = tmp_path_factory.mktemp("bad-inputs")
    _write_corpus(ws / "docs", 200)
    _write_corpus(ws / "empty", 0)
    (ws / "hostfile").write_text("node0 slots=2\nnode1 slots=two\n")
    for name in ("bad", "trunc", "short"):
        shutil.copy(ws / "docs.bin", ws / f"{name}.bin")
        shutil.copy(ws / "docs.idx", ws / f"{name}.idx")
    idx = bytearray((ws / "bad.idx").read_bytes())
    idx[:4] = b"XXXX"
    (ws / "bad.idx").write_bytes(bytes(idx))
    (ws / "trunc.bin").write_bytes((ws / "docs.bin").read_bytes()[:1000])
    (ws / "short.idx").write_bytes((ws / "docs.idx").read_bytes()[:-7])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    words = " ".join(f"w{i}" for i in range(400))
    tok.train_from_iterator([words] * 3, trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"]))
    (ws / "tok").mkdir()
    tok.save(str(ws / "tok" / "tokenizer.json"))
    (ws / "text.txt").write_text("just some text\n")

    run = train(load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.prefixes={ws / 'docs'}", f"data.cache_dir={ws / 'cache'}", f"logging.run_dir={ws / 'run'}",
        "training.train_steps=1", "training.eval_interval=0"]), log=lambda _: None)
    ckpt = run.checkpoint
    shutil.copytree(ckpt, ws / "no-shard")
    for shard in (ws / "no-shard").glob("*.safetensors"):
        shard.unlink()
    (ws / "ckpt").symlink_to(ckpt)

    (ws / "typo.yaml").write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\ntrainig:\n  train_steps: 2\n")
    (ws / "wrong-type.yaml").write_text(f"base: {ROOT / 'configs' / 'tiny.yaml'}\noptimizer:\n  lr: fast\n")
    (ws / "broken.yaml").write_text("training:\n  train_steps: [1, 2\n")
    (ws / "evil.yaml").write_text(f"training: !!python/object/apply:os.mkdir [{ws / 'yaml-ran'}]\n")
    (ws / "runs").mkdir()
    return ws


def _hashes(ws: Path) -> dict[str, str]:
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.rglob("*")) if p.is_file() and "runs" not in p.relative_to(ws).parts[:1]}


def _run(argv: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def _pretrain(ws: Path, case: str, *overrides: str, config: str | None = None) -> list[str]:
    run_dir = ws / "runs" / case
    return [sys.executable, "launch/pretrain.py", "--config", config or "configs/tiny.yaml",
            f"data.prefixes={ws / 'docs'}", f"data.cache_dir={run_dir / 'cache'}", f"logging.run_dir={run_dir}",
            "training.train_steps=2", "training.eval_interval=0", *overrides]


def _assert_one_line(proc: subprocess.CompletedProcess, *expected: str, status: int = 2) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, lines
    assert "error: " in lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# (case, argv builder, expected parts of the line). Placeholders: the workspace is passed to the builder.
CASES = {
    # configs: keys, types, values
    "unknown-key": (lambda ws: _pretrain(ws, "unknown-key", "training.micro_batchsize=2"),
                    ["unknown config key 'training.micro_batchsize'", "did you mean 'training.micro_batch_size'"]),
    "mistyped-section": (lambda ws: _pretrain(ws, "mistyped-section", config=str(ws / "typo.yaml")),
                         ["typo.yaml", "trainig", "did you mean 'training'"]),
    "wrong-type": (lambda ws: _pretrain(ws, "wrong-type", "training.train_steps=abc"),
                   ["training.train_steps='abc' must be an integer"]),
    "wrong-type-in-file": (lambda ws: _pretrain(ws, "wrong-type-in-file", config=str(ws / "wrong-type.yaml")),
                           ["wrong-type.yaml", "optimizer.lr='fast' must be a number"]),
    "negative-lr": (lambda ws: _pretrain(ws, "negative-lr", "optimizer.lr=-0.001"),
                    ["optimizer.lr=-0.001 must be positive"]),
    "warmup-longer-than-training": (lambda ws: _pretrain(ws, "warmup", "schedule.warmup_steps=50"),
                                    ["schedule.warmup_steps=50 is longer than training.train_steps=2"]),
    "sequence-longer-than-positions": (lambda ws: _pretrain(ws, "seq", "data.seq_len=4096"),
                                       ["data.seq_len=4096 exceeds model.max_seq_len="]),
    "config-not-found": (lambda ws: [sys.executable, "launch/pretrain.py", "--config", str(ws / "nope.yaml")],
                         ["config file not found", "nope.yaml"]),
    "config-not-a-mapping": (lambda ws: [sys.executable, "launch/pretrain.py", "--config", str(ws / "text.txt")],
                             ["text.txt", "expected a mapping at the top level"]),
    "config-not-yaml": (lambda ws: [sys.executable, "launch/pretrain.py", "--config", str(ws / "broken.yaml")],
                        ["broken.yaml", "not valid YAML"]),
    "config-with-a-python-tag": (lambda ws: [sys.executable, "launch/pretrain.py", "--config", str(ws / "evil.yaml")],
                                 ["evil.yaml", "not valid YAML"]),
    # data
    "no-data": (lambda ws: [sys.executable, "launch/pretrain.py", "--config", "configs/tiny.yaml",
                            f"logging.run_dir={ws / 'runs' / 'no-data'}"], ["data.prefixes is empty"]),
    "missing-corpus": (lambda ws: _pretrain(ws, "missing-corpus", f"data.prefixes={ws / 'nope'}"),
                       ["nope.idx", "file not found"]),
    "corrupt-idx": (lambda ws: _pretrain(ws, "corrupt-idx", f"data.prefixes={ws / 'bad'}"),
                    ["bad.idx", "bad magic"]),
    "truncated-bin": (lambda ws: _pretrain(ws, "truncated-bin", f"data.prefixes={ws / 'trunc'}"),
                      ["trunc.bin", "data file is 1000 bytes"]),
    "truncated-idx": (lambda ws: _pretrain(ws, "truncated-idx", f"data.prefixes={ws / 'short'}"),
                      ["short.idx", "truncated index"]),
    "empty-corpus": (lambda ws: _pretrain(ws, "empty-corpus", f"data.prefixes={ws / 'empty'}"),
                     ["empty", "leaves train empty (0 documents"]),
    "missing-tokenizer": (lambda ws: _pretrain(ws, "missing-tokenizer", f"data.tokenizer={ws / 'nope.json'}"),
                          ["nope.json", "tokenizer not found"]),
    "vocabulary-larger-than-embedding": (
        lambda ws: _pretrain(ws, "vocab", f"data.tokenizer={ws / 'tok' / 'tokenizer.json'}", "model.vocab_size=128"),
        ["tokenizer.json has token ids up to", "model.vocab_size=128: set model.vocab_size to at least"]),
    # layouts and devices (these build a topology or an engine: a few seconds each)
    "impossible-layout": (lambda ws: _pretrain(ws, "layout", "parallel.tp=3"),
                          ["world size 1 is not divisible by parallel.tp=3"]),
    "batch-does-not-divide": (lambda ws: _pretrain(ws, "batch", "training.global_batch_size=7"),
                              ["training.global_batch_size=7 is not divisible by training.micro_batch_size=2"]),
    "context-parallel-sequence": (
        lambda ws: _pretrain(ws, "cp-seq", "--dry-run", "--world", "2", "parallel.cp=2", "data.seq_len=30"),
        ["parallel.cp=2 needs data.seq_len=30 divisible by 2 x cp = 4"]),
    "precision-the-device-lacks": (
        lambda ws: _pretrain(ws, "precision", "parallel.engine=deepspeed", "training.precision=fp16"),
        ["training.precision=fp16 with parallel.engine=deepspeed needs a GPU"]),
    # checkpoints and directories
    "checkpoint-of-another-shape": (
        lambda ws: _pretrain(ws, "shape", f"checkpoint.load={ws / 'ckpt'}", "model.hidden_size=64",
                             "model.num_heads=2"),
        ["cannot load its tensors", "Size mismatch", "model."]),
    "checkpoint-missing-a-shard": (lambda ws: _pretrain(ws, "shard", f"checkpoint.load={ws / 'no-shard'}"),
                                   ["no-shard", "cannot load its tensors"]),
    "checkpoint-not-there": (lambda ws: _pretrain(ws, "no-ckpt", f"checkpoint.load={ws / 'nope-ckpt'}"),
                             ["nope-ckpt is not a checkpoint", "meta.json is missing"]),
    "unwritable-run-dir": (lambda ws: _pretrain(ws, "ro", f"logging.run_dir={_unwritable(ws)}"),
                           ["cannot write there", "set logging.run_dir"]),
    # tools
    "preprocess-missing-input": (
        lambda ws: [sys.executable, "tools/preprocess_data.py", "--input", str(ws / "nope.jsonl"), "--tokenizer",
                    str(ws / "tok" / "tokenizer.json"), "--output-prefix", str(ws / "runs" / "pre" / "p")],
        ["nope.jsonl", "input file not found"]),
    "preprocess-unreadable-tokenizer": (
        lambda ws: [sys.executable, "tools/preprocess_data.py", "--input", str(ws / "text.txt"), "--tokenizer",
                    str(ws / "text.txt"), "--output-prefix", str(ws / "runs" / "pre2" / "p")],
        ["text.txt: unreadable tokenizer"]),
    "train-tokenizer-vocabulary-too-small": (
        lambda ws: [sys.executable, "tools/train_tokenizer.py", "--input", str(ws / "text.txt"), "--vocab-size",
                    "10", "--output", str(ws / "runs" / "tok")], ["--vocab-size 10 is too small"]),
    "merge-a-corrupt-shard": (
        lambda ws: [sys.executable, "tools/merge_shards.py", "--inputs", str(ws / "docs"), str(ws / "bad"),
                    "--output-prefix", str(ws / "runs" / "merged")], ["bad.idx", "bad magic"]),
    "plot-a-missing-run": (lambda ws: [sys.executable, "tools/plot_metrics.py", str(ws / "nope-run")],
                           ["nope-run/metrics.jsonl not found"]),
    "plan-unknown-preset": (lambda ws: [sys.executable, "tools/plan.py", "model", "--preset", "gpt5-nano"],
                            ["unknown preset 'gpt5-nano'"]),
    "loss-compare-help-example-without-data": (
        lambda ws: [sys.executable, "tools/loss_compare.py", "--config", "configs/tiny.yaml", "--layouts",
                    "single,ddp2"], ["configs/tiny.yaml names no data: add data.prefixes=PREFIX"]),
    "loss-compare-unknown-layout": (
        lambda ws: [sys.executable, "tools/loss_compare.py", "--config", "configs/tiny.yaml", "--layouts", "zero5"],
        ["layout 'zero5': unknown part 'zero5'"]),
    "slurm-malformed-hostfile": (
        lambda ws: ["env", "LAUNCHER=deepspeed", f"HOSTFILE={ws / 'hostfile'}", "bash", "launch/slurm.sbatch",
                    "configs/tiny.yaml"],
        ["hostfile line 2: 'node1 slots=two': expected 'HOSTNAME slots=N'"]),
    "quickstart-without-a-launcher": (
        lambda ws: [str(_bare_python(ws)), "tools/quickstart.py", "--out", str(ws / "runs" / "qs")],
        ["the deepspeed launcher is neither beside", "--launcher torchrun, or --ranks 1"]),
}


def _unwritable(ws: Path) -> Path:
    """A directory nobody may write into: a read-only one, or for root (who ignores modes) one in sysfs."""
    if os.geteuid() == 0:
        return Path("/sys/megatron_lite_run")
    ro = ws / "runs" / "read-only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return ro / "run"


def _bare_python(ws: Path) -> Path:
    """An interpreter with no deepspeed launcher beside it (the stand-alone python a venv was made from)."""
    link = ws / "runs" / "bare" / "python"
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(sys.executable).resolve())
    return link


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_in_one_line_and_changes_nothing(case, ws):
    build, expected = CASES[case]
    argv = build(ws)
    before = _hashes(ws)
    env = {**ENV, "PATH": "/usr/bin:/bin"} if case == "quickstart-without-a-launcher" else ENV
    proc = _run(argv, env=env)
    _assert_one_line(proc, *expected)
    assert _hashes(ws) == before
    assert not (ws / "yaml-ran").exists()


@pytest.mark.parametrize("override, expected", [
    ("parallel.tp=3", "world size 1 is not divisible by parallel.tp=3"),
    ("training.global_batch_size=7", "training.global_batch_size=7 is not divisible"),
])
def test_a_layout_the_rules_refuse_fails_before_torch_is_imported(ws, override, expected):
    """The entry point checks the layout at the launched world size before it imports torch (seconds, on every rank)."""
    argv = _pretrain(ws, "early", override)[1:]
    code = ("import runpy, sys; main = runpy.run_path(sys.argv[1], run_name='pretrain')['main']; "
            "status = main(sys.argv[2:]); print(status, 'torch' in sys.modules)")
    proc = _run([sys.executable, "-c", code, *argv])
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr[-2000:]
    assert expected in proc.stderr


def test_debug_adds_the_traceback(ws):
    proc = _run([*_pretrain(ws, "debug", "data.seq_len=4096"), "--debug"])
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "data.seq_len=4096" in proc.stderr


def _hold(directory: str, ready: str) -> None:
    from megatron_lite.training.run_lock import RunLock

    lock = RunLock(Path(directory))
    lock.acquire()
    Path(ready).write_text("held")
    time.sleep(120)
    lock.release()


def test_a_run_dir_held_by_a_live_run_is_refused_naming_the_holder(ws):
    run_dir, ready = ws / "runs" / "held", ws / "runs" / "held-ready"
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(str(run_dir), str(ready)), daemon=True)
    holder.start()
    try:
        while not ready.exists() and holder.is_alive():
            time.sleep(0.02)
        before = _hashes(ws)
        lock_bytes = (run_dir / ".run.lock").read_bytes()
        proc = _run(_pretrain(ws, "held"))
        _assert_one_line(proc, f"is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started ")
        assert _hashes(ws) == before and (run_dir / ".run.lock").read_bytes() == lock_bytes
        assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock"]  # no metrics, no checkpoints
    finally:
        holder.kill()
        holder.join()


def test_two_ranks_print_an_error_once(ws):
    """Two ranks, started as a launcher starts them, both fail on the same corrupt shard: one line, status 2 on each."""
    from megatron_lite.parity import free_port

    port = str(free_port())
    argv = _pretrain(ws, "two-ranks", f"data.prefixes={ws / 'bad'}")
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    lines = [ln for err in errs for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.idx" in lines[0] and "bad magic" in lines[0], lines
    assert "Traceback" not in "".join(errs)


def test_plan_says_which_training_defaults_it_assumed_for_a_model_only_config(ws):
    """A model preset has no training settings: the plan must say what it assumed (or ask), not plan silently."""
    proc = _run([sys.executable, "tools/plan.py", "memory", "--config", "configs/models/tiny.yaml"])
    if proc.returncode == 2:
        _assert_one_line(proc, "configs/models/tiny.yaml")
    else:
        assert proc.returncode == 0, proc.stderr
        defaults = [ln for ln in proc.stdout.splitlines() if ln.startswith("defaults")]
        assert defaults and "seq 1024" in defaults[0] and "dtype" in defaults[0], proc.stdout


def test_quickstart_finds_the_launcher_beside_its_interpreter(monkeypatch):
    """A venv's python run without activating the venv (its bin directory not on PATH) still finds deepspeed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "tools" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    beside = Path(sys.executable).parent / "deepspeed"
    if not beside.is_file():
        pytest.skip("deepspeed is not installed beside this interpreter")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert quickstart.find_launcher("deepspeed") == str(beside)
