"""Training across two hosts (network namespaces on one machine), two CPU ranks on each, through the real launchers.

Each test starts one launcher per host, as a user does on two nodes, and compares the losses (within 1e-5) and the
gradient norms before clipping (within 1e-5 relative: a sum where an average belongs shows there, not in the losses)
with one process on the same global batch. The failure tests kill a whole host, one rank, or signal every rank, and check
what the survivors say, how fast they stop, and that the run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_lite.parity import run_layout
from megatron_lite.step.checkpoint_format import find_latest
from tests.multinode.hosts import Hosts

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
pytestmark = pytest.mark.slow

_references: dict[tuple, tuple[list[float], list[float]]] = {}


def single_run(tiny_config: str, steps: int) -> tuple[list[float], list[float]]:
    """One process on the same global batch: the losses and gradient norms every layout must give."""
    if (tiny_config, steps) not in _references:
        run = run_layout("single", tiny_config, [f"training.train_steps={steps}"])
        _references[(tiny_config, steps)] = (run.losses, run.grad_norms)
    return _references[(tiny_config, steps)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def _train_args(tiny_config: str, run: Path, steps: int, *overrides: str) -> list[str]:
    return [str(REPO / "launch" / "pretrain.py"), "--config", tiny_config, f"logging.run_dir={run}",
            f"training.train_steps={steps}", "checkpoint.interval=2", "parallel.timeout_s=20", *overrides]


def torchrun(hosts: Hosts, host: int, port: int, *extra: str) -> list[str]:
    """torchrun on ``host`` joining the c10d rendezvous that host 0 serves."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts.addrs[0]}:{port}", "--rdzv_id", f"job{port}",
            "--local_addr", hosts.addrs[host], *extra]


def deepspeed_no_ssh(hosts: Hosts, host: int, port: int, hostfile: Path) -> list[str]:
    """The deepspeed launcher on ``host`` in --no_ssh mode: each node starts its own ranks."""
    return [str(Path(sys.executable).with_name("deepspeed")), "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(host), "--master_addr", hosts.addrs[0], "--master_port", str(port)]


def launch(hosts: Hosts, launchers: list[list[str]], args: list[str], logs: Path, env: list[dict] | None = None
           ) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    return [hosts.popen(i, [*cmd, *args], (env or [{}, {}])[i] | _env(), logs / f"host{i}.log", REPO)
            for i, cmd in enumerate(launchers)]


def wait_all(procs: list[subprocess.Popen], logs: Path, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"a launcher did not finish within {timeout:.0f} s:\n{_tails(logs)}")
    return [p.returncode for p in procs]


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-2500:]}" for f in sorted(logs.glob("*.log")))


def records_by_step(run: Path) -> dict[int, dict]:
    """The last train record logged for each step (a resumed run logs the steps after its checkpoint again)."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "step" in record:
            out[record["step"]] = record
    return out


def wait_for(predicate, what: str, logs: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{_tails(logs)}")
        time.sleep(0.05)


NORM_STEPS = 4  # later training steps' norms drift apart on correct layouts (AdamW noise); their losses do not


def assert_matches(run: Path, reference: tuple[list[float], list[float]], steps: range) -> None:
    got, (losses, norms) = records_by_step(run), reference
    for step in steps:
        assert abs(got[step]["loss"] - losses[step - 1]) < TOL, (step, got[step]["loss"], losses[step - 1])
        norm = got[step]["grad_norm"]
        if step <= NORM_STEPS:
            assert abs(norm - norms[step - 1]) < TOL * norms[step - 1], (step, norm, norms[step - 1])


def worker_pids(hosts: Hosts, host: int) -> list[int]:
    """The training ranks on ``host`` (not the launchers or their agents)."""
    pids = []
    for pid in hosts.pids(host):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"launch/pretrain.py") for c in cmd) and not any(b"distributed.run" in c or
                                                                           c.endswith(b"deepspeed") for c in cmd):
            pids.append(pid)
    return pids


FAKE_SRUN = """#!/bin/sh
# SLURM's srun for the test: one task per host, each in its host's namespace with SLURM_NODEID set
while [ "${1#--}" != "$1" ]; do shift; done
pids=""
i=0
for ns in $TEST_NAMESPACES; do
  SLURM_NODEID=$i ip netns exec "$ns" unshare --uts sh -c 'hostname "$1"; shift; exec "$@"' sh "node$i" "$@" \
    > "$TEST_LOGS/host$i.log" 2>&1 &
  pids="$pids $!"
  i=$((i + 1))
done
status=0
for pid in $pids; do wait "$pid" || status=1; done
exit $status
"""


def slurm_job(hosts: Hosts, tmp_path: Path, logs: Path, config: str, *overrides: str) -> subprocess.CompletedProcess:
    """``launch/slurm.sbatch`` as SLURM would run it on two nodes (with stand-ins for srun and scontrol)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\nprintf '{hosts.hostnames[0]}\\n{hosts.hostnames[1]}\\n'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    logs.mkdir()
    env = {**_env(), **hosts.env, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "2",
           "MASTER_PORT": "29611", "RUN_DIR": str(tmp_path / "run"), "TEST_NAMESPACES": " ".join(hosts.names),
           "TEST_LOGS": str(logs)}
    return subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), config, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_slurm_template_starts_torchrun_on_two_hosts_and_matches_one_process(hosts, tiny_config, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = slurm_job(hosts, tmp_path, logs, tiny_config, "training.train_steps=4", "parallel.engine=ddp")
    assert job.returncode == 0, job.stdout + job.stderr + _tails(logs)
    assert_matches(run, single_run(tiny_config, 4), range(1, 5))
    _check_banner_and_logs(hosts, run, (logs / "host0.log").read_text(), "ddp")


def test_torchrun_two_hosts_fsdp_matches_one_process(hosts, tiny_config, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    procs = launch(hosts, [torchrun(hosts, i, 29611) for i in range(2)],
                   _train_args(tiny_config, run, 4, "parallel.engine=fsdp"), logs)
    assert wait_all(procs, logs) == [0, 0], _tails(logs)
    assert_matches(run, single_run(tiny_config, 4), range(1, 5))
    _check_banner_and_logs(hosts, run, (logs / "host0.log").read_text(), "fsdp")


def _check_banner_and_logs(hosts: Hosts, run: Path, console: str, engine: str) -> None:
    assert f"world 4 = pp 1 x dp 4 x tp 1; engine {engine}" in console
    assert f"host node0 ({hosts.addrs[0]}): ranks 0-1" in console
    assert f"host node1 ({hosts.addrs[1]}): ranks 2-3" in console
    assert "torch " in console and "deepspeed " in console
    for host, ranks in (("node0", (0, 1)), ("node1", (2, 3))):  # a log file per rank, grouped by host
        for rank in ranks:
            assert "done: step 4" in (run / "logs" / host / f"rank-{rank}.log").read_text()
    assert "step      4/4 | loss" in (run / "logs" / "node0" / "rank-0.log").read_text()


def test_deepspeed_hostfile_no_ssh_zero1_matches_one_process(hosts, tiny_config, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    procs = launch(hosts, [deepspeed_no_ssh(hosts, i, 29612, hostfile) for i in range(2)],
                   _train_args(tiny_config, run, 4, "parallel.engine=deepspeed", "parallel.zero_stage=1"), logs)
    assert wait_all(procs, logs) == [0, 0], _tails(logs)
    assert_matches(run, single_run(tiny_config, 4), range(1, 5))
    assert "engine deepspeed" in (logs / "host0.log").read_text()


def test_lost_host_fails_the_survivors_quickly_naming_it_then_both_resume(hosts, tiny_config, tmp_path):
    """Host 1 stops after step 3 (a test hook) and is then SIGKILLed whole, while host 0 waits in step 3's
    collectives: host 0's ranks exit non-zero within parallel.timeout_s, naming node1 and its ranks."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = _train_args(tiny_config, run, 6, "parallel.engine=ddp")
    procs = launch(hosts, [torchrun(hosts, i, 29613) for i in range(2)], args, logs,
                   env=[{}, {"MEGATRON_LITE_PAUSE_AT": f"step:3:{tmp_path / 'paused'}"}])
    wait_for(lambda: find_latest(run / "checkpoints") is not None, "the checkpoint of step 2", logs)
    time.sleep(1.0)  # host 0 is now blocked in step 3, waiting for host 1
    killed = time.monotonic()
    hosts.kill_host(1)
    try:
        procs[0].wait(timeout=20 + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"host 0 still runs {20 + 15} s after host 1 died:\n{_tails(logs)}")
    assert procs[0].returncode != 0
    assert time.monotonic() - killed < 20 + 15
    survivor = (logs / "host0.log").read_text()
    assert f"lost its peer node1 (ranks 2-3, {hosts.addrs[1]})" in survivor, survivor[-3000:]
    assert find_latest(run / "checkpoints").name == "step_00000002"

    relaunched = launch(hosts, [torchrun(hosts, i, 29614) for i in range(2)], args, tmp_path / "logs2")
    assert wait_all(relaunched, tmp_path / "logs2") == [0, 0], _tails(tmp_path / "logs2")
    assert "resumed from" in (tmp_path / "logs2" / "host0.log").read_text()
    assert_matches(run, single_run(tiny_config, 6), range(1, 7))


def test_torchrun_restarts_a_killed_rank_and_the_run_completes(hosts, tiny_config, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    steps = 16
    # Restarted workers need a fresh store: with the rendezvous store shared (torch's default), a restarted round
    # can read the previous round's addresses and fail to connect (docs/multinode.md, "Restarts").
    fresh_store = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    procs = launch(hosts, [torchrun(hosts, i, 29615, "--max-restarts", "1") for i in range(2)],
                   _train_args(tiny_config, run, steps, "parallel.engine=ddp"), logs, env=[fresh_store, fresh_store])
    wait_for(lambda: find_latest(run / "checkpoints") is not None, "the first checkpoint", logs)
    victims = worker_pids(hosts, 1)
    assert victims, _tails(logs)
    os.kill(victims[0], signal.SIGKILL)
    assert wait_all(procs, logs) == [0, 0], _tails(logs)
    assert (logs / "host0.log").read_text().count("resumed from") == 1
    assert_matches(run, single_run(tiny_config, steps), range(1, steps + 1))


def test_sigterm_on_every_rank_saves_and_exits_zero(hosts, tiny_config, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    steps = 16
    procs = launch(hosts, [torchrun(hosts, i, 29616) for i in range(2)],
                   _train_args(tiny_config, run, steps, "parallel.engine=ddp", "checkpoint.interval=0"), logs)
    wait_for(lambda: (run / "metrics.jsonl").exists() and records_by_step(run), "the first step", logs)
    for host in range(2):
        for pid in worker_pids(hosts, host):
            os.kill(pid, signal.SIGTERM)
    assert wait_all(procs, logs) == [0, 0], _tails(logs)
    latest = find_latest(run / "checkpoints")
    reached = max(records_by_step(run))
    assert latest is not None and latest.name == f"step_{reached:08d}" and reached < steps, _tails(logs)
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["saved_layout"]["world_size"] == 4
