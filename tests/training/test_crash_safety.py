"""A run survives what kills runs: kill -9 anywhere, a second launch on the same directory, SIGTERM, NaNs, a full disk,
and checkpoint files that try to run code.

The kill harness forks a process that starts a new session and runs the ranks (forked again, as ``run_ranks`` does),
pauses them at a chosen point through the ``MEGATRON_LITE_PAUSE_AT`` test hook, and kills the whole session with
SIGKILL. Rerunning the same command must resume from ``latest`` and give, step for step, exactly the losses of one
uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO, checkpoint_tensors, model_tensors, tiny_config
from megatron_lite.errors import CheckpointError, CheckpointWriteError, ConfigError, NonFiniteError, RunDirLocked
from megatron_lite.step.checkpoint_format import find_latest, read_meta
from megatron_lite.training.checkpoint import load_checkpoint
from megatron_lite.training.pause_points import ENV as PAUSE_ENV
from megatron_lite.training.run_lock import RunLock
from megatron_lite.training.trainer import Trainer, train

QUIET = {"log": lambda _: None}
FORK = multiprocessing.get_context("fork")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def config_file(corpus, tmp_path_factory) -> str:
    """configs/tiny.yaml on the test corpus, as a file (forked layouts take a path and overrides)."""
    path = tmp_path_factory.mktemp("crash-config") / "tiny.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'tiny.yaml'}\ndata:\n  prefixes: {corpus}\n"
                    f"  cache_dir: {corpus.parent / 'cache'}\nlogging:\n  wandb_mode: disabled\n")
    return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# One live run per directory
# ----------------------------------------------------------------------------------------------------------------------

def _hold_lock(directory: str, ready: str) -> None:
    lock = RunLock(Path(directory))
    lock.acquire()
    Path(ready).write_text("locked")
    time.sleep(120)
    lock.release()


def test_a_live_run_dir_is_refused_naming_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, corpus):
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    holder = FORK.Process(target=_hold_lock, args=(str(run_dir), str(ready)), daemon=True)
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        before = _hashes(run_dir)
        with pytest.raises(RunDirLocked) as info:
            Trainer(tiny_config(run_dir, corpus, "training.train_steps=1"), **QUIET)
        message = str(info.value)
        assert "\n" not in message
        assert re.search(rf"in use by another run \(host {re.escape(socket.gethostname())}, pid {holder.pid}, "
                         r"started 20\d\d-\d\d-\d\dT", message), message
        assert _hashes(run_dir) == before  # refused before anything was written
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a dead holder: the kernel drops its lock
        holder.join()
    result = train(tiny_config(run_dir, corpus, "training.train_steps=1"), **QUIET)
    assert result.final_step == 1 and find_latest(run_dir / "checkpoints") is not None
    assert json.loads((run_dir / ".run.lock").read_text())["pid"] == os.getpid()  # the new holder recorded itself


# ----------------------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------------------

def test_sigterm_stops_one_process_at_a_step_boundary_with_a_checkpoint_and_exit_0(tmp_path, config_file, corpus):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "launch/pretrain.py", "--config", config_file, f"logging.run_dir={run_dir}",
           "training.train_steps=100000", "training.eval_interval=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step ") and "/100000" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = re.search(r"SIGTERM: stopping after step (\d+), saving a checkpoint first", out)
    assert stopped, out
    step = int(stopped.group(1))
    latest = find_latest(run_dir / "checkpoints")
    assert latest.name == f"step_{step:08d}"
    meta = read_meta(latest)
    assert meta["step"] == step and meta["consumed_samples"] == 8 * step
    resumed = train(tiny_config(run_dir, corpus, f"training.train_steps={step + 1}", "training.eval_interval=0"),
                    **QUIET)
    assert resumed.steps == [step + 1]


def _signal_rank0_after_first_save(rank: int, config: str, overrides: list[str], out: str) -> None:
    """Rank 0 alone gets SIGTERM, while it writes the checkpoint of step 2; both ranks must stop after step 2."""
    from megatron_lite.config import load_config

    def log(line: str) -> None:
        if line.startswith("saved checkpoint") and line.endswith("step_00000002"):
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(load_config(config, overrides), log=log)
    Path(f"{out}.{rank}").write_text(json.dumps({"final_step": result.final_step, "stopped_by": result.stopped_by,
                                                 "steps": result.steps}))


def test_sigterm_on_one_of_two_ranks_stops_both_after_the_same_step(tmp_path, config_file):
    from megatron_lite.parity import parse_layout, preload, run_ranks

    layout = parse_layout("fsdp2")
    preload([layout])
    ckpt = tmp_path / "ckpt"
    overrides = [*layout.overrides, f"logging.run_dir={tmp_path / 'run'}", f"checkpoint.dir={ckpt}",
                 "training.train_steps=6", "checkpoint.interval=2", "training.eval_interval=0"]
    run_ranks(_signal_rank0_after_first_save, 2, (config_file, overrides, str(tmp_path / "result")), timeout=300,
              log_dir=str(tmp_path))
    ranks = [json.loads(Path(f"{tmp_path / 'result'}.{r}").read_text()) for r in (0, 1)]
    assert ranks[0] == {"final_step": 2, "stopped_by": "SIGTERM", "steps": [1, 2]}
    assert ranks[1] == {"final_step": 2, "stopped_by": "a signal on another rank", "steps": [1, 2]}
    assert find_latest(ckpt).name == "step_00000002" and sorted(p.name for p in ckpt.glob("step_*")) == [
        "step_00000002"]  # stopped after the interval save: no second checkpoint of the same step


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite steps and loss spikes
# ----------------------------------------------------------------------------------------------------------------------

def _poison(monkeypatch, steps: set[int], rank: int | None = None, factor: float = float("nan"),
            microbatches: int = 2) -> None:
    """Multiply the training loss by ``factor`` during ``steps`` (1-based), on ``rank`` only when given;
    ``microbatches`` per step and rank (the tiny config's 8 samples in 2-sample microbatches: 4 on one rank)."""
    from megatron_lite.step.tasks import CausalLMTask

    original = CausalLMTask.loss
    calls = {"n": 0}

    def loss(self, output, target, training):
        total, count = original(self, output, target, training)
        if training:
            calls["n"] += 1
            step = (calls["n"] - 1) // microbatches + 1
            if step in steps and (rank is None or int(os.environ.get("RANK", "0")) == rank):
                total = total * factor
        return total, count

    monkeypatch.setattr(CausalLMTask, "loss", loss)


@pytest.mark.parametrize("layout", ["fsdp2", "zero1", "zero0"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(layout, monkeypatch, tmp_path, config_file):
    """Rank 1's loss is NaN at step 3: both ranks skip the optimizer step (weights and AdamW state as after step 2),
    log it, and train on at step 4."""
    from megatron_lite.parity import run_layout

    _poison(monkeypatch, {3}, rank=1)
    ckpt = tmp_path / "ckpt"
    run = run_layout(layout, config_file, ["training.train_steps=4", "checkpoint.interval=1", "checkpoint.keep_last=4",
                                           "training.eval_interval=0"], timeout=300, checkpoint_dir=ckpt)
    losses = run.losses
    assert all(map(torch.isfinite, torch.tensor(losses[:2] + losses[3:]))) and losses[2] != losses[2], losses
    assert [r["skipped"] for r in run.records] == [False, False, True, False]
    from safetensors.torch import load_file

    files = sorted(p.name for p in (ckpt / "step_00000002").glob("*.safetensors"))
    assert files == sorted(p.name for p in (ckpt / "step_00000003").glob("*.safetensors"))
    full2, full3 = {}, {}
    for name in files:  # each writer rank's file, piece by piece
        full2.update({f"{name}:{k}": v for k, v in load_file(str(ckpt / "step_00000002" / name)).items()})
        full3.update({f"{name}:{k}": v for k, v in load_file(str(ckpt / "step_00000003" / name)).items()})
    assert full2.keys() == full3.keys()
    assert all(torch.equal(full2[k], full3[k]) for k in full2), "a skipped step changed the weights or AdamW state"
    assert any(k.endswith(".step") for k in full2)


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(monkeypatch, tmp_path,
                                                                                         corpus):
    _poison(monkeypatch, set(range(3, 100)), microbatches=4)
    lines: list[str] = []
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"3 steps in a row were skipped \(last: step 5.*more than "
                                             r"training.max_skipped_steps=2"):
        train(tiny_config(run_dir, corpus, "training.train_steps=8", "checkpoint.interval=2",
                          "training.max_skipped_steps=2"), log=lines.append)
    root = run_dir / "checkpoints"
    assert find_latest(root).name == "step_00000004"  # saved at its interval, before the limit was passed
    assert model_tensors(root / "step_00000004").keys() == model_tensors(root / "step_00000002").keys()
    good, kept = model_tensors(root / "step_00000002"), model_tensors(root / "step_00000004")
    assert all(torch.equal(good[k], kept[k]) for k in good)  # the skipped steps never touched the weights
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "skipped_step"] == [3, 4]


def test_a_loss_spike_is_logged(monkeypatch, tmp_path, corpus):
    _poison(monkeypatch, {7}, factor=4.0, microbatches=4)
    run_dir = tmp_path / "run"
    result = train(tiny_config(run_dir, corpus, "training.train_steps=8", "training.loss_spike_factor=2"), **QUIET)
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    spikes = [e for e in events if e.get("event") == "loss_spike"]
    assert [e["step"] for e in spikes] == [7], spikes
    assert "training.loss_spike_factor=2" in spikes[0]["message"] and result.final_step == 8


# ----------------------------------------------------------------------------------------------------------------------
# Kill -9 anywhere
# ----------------------------------------------------------------------------------------------------------------------

RUN = ["training.train_steps=6", "checkpoint.interval=2", "checkpoint.keep_last=5", "training.eval_interval=2"]


def _session(layout: str, config: str, ckpt: str, workdir: str, pause: str) -> None:
    os.setsid()  # the ranks this forks share the session: one killpg reaches them all
    os.environ[PAUSE_ENV] = pause
    from megatron_lite.parity import run_layout

    run_layout(layout, config, RUN, timeout=300, workdir=workdir, checkpoint_dir=ckpt)


@pytest.fixture(scope="module")
def references(config_file, tmp_path_factory):
    """One uninterrupted run per layout, computed once: (losses, checkpoint dir)."""
    from megatron_lite.parity import run_layout

    cache: dict[str, tuple[list[float], Path]] = {}

    def get(layout: str) -> tuple[list[float], Path]:
        if layout not in cache:
            ckpt = tmp_path_factory.mktemp(f"reference-{layout}")
            cache[layout] = (run_layout(layout, config_file, RUN, timeout=300, checkpoint_dir=ckpt).losses, ckpt)
        return cache[layout]

    return get


@pytest.mark.parametrize(
    "layout, point, step",
    [("single", "step", 3), ("single", "eval", 4), ("single", "save", 4), ("zero1", "save", 4), ("fsdp2", "step", 3),
     ("fsdp2", "eval", 4)],
)
def test_kill_9_then_rerun_resumes_bit_identically(layout, point, step, references, config_file, tmp_path):
    from megatron_lite.parity import preload, parse_layout, run_layout

    reference, reference_ckpt = references(layout)
    preload([parse_layout(layout)])
    ckpt, marker = tmp_path / "ckpt", tmp_path / "paused"
    victim = FORK.Process(target=_session, args=(layout, config_file, str(ckpt), str(tmp_path),
                                                 f"{point}:{step}:{marker}"))
    victim.start()
    deadline = time.monotonic() + 240
    while not marker.exists() and victim.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never reached {point} {step}"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.join()

    latest = find_latest(ckpt)
    assert latest.name == "step_00000002"  # the kill left the last complete checkpoint in place
    assert read_meta(latest)["step"] == 2 and checkpoint_tensors(latest)
    partial = ckpt / ".tmp-step_00000004"
    assert partial.exists() == (point == "save")

    resumed = run_layout(layout, config_file, RUN, timeout=300, workdir=str(tmp_path), checkpoint_dir=ckpt)
    assert resumed.losses == reference[2:]  # exact: the same bits as the uninterrupted run
    assert not partial.exists() and not list(ckpt.glob(".tmp-*"))
    assert find_latest(ckpt).name == "step_00000006"
    if layout == "single":  # one writer rank: the files hold the same bytes
        a, b = checkpoint_tensors(reference_ckpt / "step_00000006"), checkpoint_tensors(ckpt / "step_00000006")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_renamed_but_not_yet_named_by_latest_is_adopted(tmp_path, corpus):
    """A kill between the rename and the update of ``latest``: the complete newer checkpoint is resumed from."""
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "training.train_steps=4", "checkpoint.interval=2"), **QUIET)
    root = run_dir / "checkpoints"
    (root / "latest").write_text("step_00000002\n")  # as if the kill came just before latest moved on
    lines: list[str] = []
    again = train(tiny_config(run_dir, corpus, "training.train_steps=5", "checkpoint.interval=2"), log=lines.append)
    assert again.steps == [5] and any("step_00000004 is complete and newer" in x for x in lines)


# ----------------------------------------------------------------------------------------------------------------------
# Disk full or an I/O error during a save
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["tensors", "meta"])
def test_a_full_disk_during_a_save_fails_clearly_and_keeps_the_previous_checkpoint(where, monkeypatch, tmp_path,
                                                                                  corpus):
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "training.train_steps=2", "checkpoint.interval=2"), **QUIET)
    root = run_dir / "checkpoints"
    before = _hashes(root)

    def full(path, *_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if where == "tensors":  # DCP's own writer runs out of space half-way through a shard
        class FullDisk:
            def __init__(self, stream, path):
                self.stream, self.path = stream, path

            def write(self, data):
                self.stream.write(bytes(data)[: len(data) // 2])
                full(self.path)

            def __getattr__(self, name):
                return getattr(self.stream, name)

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with open(path, mode) as stream:
                yield FullDisk(stream, path) if str(path).endswith(".safetensors") else stream

        monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    else:
        real_write = Path.write_text
        monkeypatch.setattr(Path, "write_text",
                            lambda self, *a, **k: full(self) if self.name == "meta.json" else real_write(self, *a, **k))
    with pytest.raises(CheckpointWriteError) as info:
        train(tiny_config(run_dir, corpus, "training.train_steps=4", "checkpoint.interval=2"), **QUIET)
    message = str(info.value)
    assert message.startswith(f"could not write checkpoint {root / 'step_00000004'}: no space left on the device")
    assert message.endswith(f"{root / 'latest'} still names step_00000002") and "\n" not in message
    assert _hashes(root) == before  # the previous checkpoint and latest untouched, the partial one removed
    monkeypatch.undo()
    load_checkpoint(find_latest(root), Trainer(tiny_config(tmp_path / "check", corpus), **QUIET).engine)


# ----------------------------------------------------------------------------------------------------------------------
# Untrusted files
# ----------------------------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("untrusted") / "run"
    result = train(tiny_config(run_dir, corpus, "training.train_steps=1"), **QUIET)
    return result.checkpoint


def test_no_file_of_a_checkpoint_runs_a_pickle_payload(saved, tmp_path, corpus):
    files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert {"meta.json", "config.yaml", "rng/rank_00000.json"} <= set(files)
    assert any(f.endswith(".safetensors") for f in files)
    engine = Trainer(tiny_config(tmp_path / "loader", corpus), **QUIET).engine
    marker = tmp_path / "payload-ran"
    payloads = {"pickle": pickle.dumps(_Payload(marker))}
    zipped = tmp_path / "payload.pt"
    torch.save({"x": _Payload(marker)}, zipped)  # torch.save's zip format: a pickle inside
    payloads["torch.save"] = zipped.read_bytes()
    for name in files:
        for kind, data in payloads.items():
            copy = tmp_path / f"ckpt-{kind}-{name.replace('/', '_')}"
            shutil.copytree(saved, copy)
            (copy / name).write_bytes(data)
            try:
                load_checkpoint(copy, engine)
            except CheckpointError as e:
                assert "\n" not in str(e) and str(copy) in str(e), (name, kind, str(e))
            else:
                # read by other tools (as YAML / JSON data), not by a resume: safetensors headers list the tensors
                assert name in ("config.yaml", "model.safetensors.index.json"), f"{name} with a {kind} payload loaded"
            assert not marker.exists(), f"loading {name} ran a {kind} payload"
    assert not list(saved.parent.glob("*.pt")) and not marker.exists()


def test_configs_are_read_with_the_safe_yaml_loader(tmp_path):
    from megatron_lite.config import load_config

    marker = tmp_path / "yaml-ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"training: !!python/object/apply:os.mkdir [{marker}]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config)
    with pytest.raises(ConfigError):
        load_config(None, [f"training.seed=!!python/object/apply:os.mkdir [{marker}]"])
    assert not marker.exists()


def test_the_code_has_no_eval_exec_unsafe_yaml_pickle_or_shell():
    """Configs, checkpoints, hostfiles and paths are data: nothing in the package or its tools runs them (pickle only
    behind a user's explicit ``--trust-pickle`` for a foreign file)."""
    pattern = re.compile(r"\b(eval|exec)\(|yaml\.(load|unsafe_load)\(|pickle\.loads?\(|shell=True|os\.system\(|"
                         r"os\.popen\(|torch\.load\((?![^)]*weights_only=True)")
    offenders = []
    for path in [*sorted((REPO / "megatron_lite").rglob("*.py")), *sorted((REPO / "tools").glob("*.py")),
                 REPO / "launch" / "pretrain.py"]:
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            code = line.split("#", 1)[0]
            opted_in = "trust_pickle" in code or (n > 1 and "if trust_pickle" in lines[n - 2])  # the user's explicit flag
            if pattern.search(code) and ".eval()" not in code and not opted_in:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders
