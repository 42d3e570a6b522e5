"""Two hosts on one machine: a pair of network namespaces joined by a veth link.

Each host gets its own network stack (only loopback and its end of the link, with an address from a private range
that exists only inside these namespaces) and, through ``unshare --uts``, its own hostname. Processes started with
:meth:`Hosts.popen` run inside one host, so the launchers, rendezvous and gloo traffic between them really cross an
interface, and killing every process of one host is what losing a node looks like to the other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ETC_NETNS = Path("/etc/netns")
SUBNET = "10.231.{n}.{host}/24"  # a test range; nothing outside the two namespaces holds these addresses


def can_make_hosts() -> str | None:
    """None when namespaces can be made here, else the reason they cannot (for a skip)."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs the `ip` (iproute2) and `unshare` (util-linux) commands"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"mlprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    """Namespaces ``names[i]`` with hostnames ``hostnames[i]`` and addresses ``addrs[i]``; remove with :meth:`close`."""

    names: list[str]
    hostnames: list[str]
    addrs: list[str]
    ifname: str = "mlveth"
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def make(cls, count: int = 2) -> "Hosts":
        assert count == 2, "a veth link joins exactly two hosts"
        tag = uuid.uuid4().hex[:6]
        n = int(tag[:2], 16)  # a /24 per test run, so parallel runs do not share addresses
        hosts = cls([f"ml{tag}h{i}" for i in range(count)], [f"node{i}" for i in range(count)],
                    [SUBNET.format(n=n, host=i + 1).split("/")[0] for i in range(count)])
        try:
            table = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(hosts.addrs, hosts.hostnames))
            for name in hosts.names:
                _ip("netns", "add", name)
                etc = ETC_NETNS / name  # `ip netns exec` mounts these files over /etc: each host's name table
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(table)
                _ip("link", "set", "lo", "up", ns=name)
            peer = f"mlp{tag}"
            _ip("link", "add", f"mla{tag}", "netns", hosts.names[0], "type", "veth", "peer", "name", peer,
                "netns", hosts.names[1])
            for i, name in enumerate(hosts.names):
                _ip("link", "set", f"mla{tag}" if i == 0 else peer, "name", hosts.ifname, ns=name)
                _ip("addr", "add", SUBNET.format(n=n, host=i + 1), "dev", hosts.ifname, ns=name)
                _ip("link", "set", hosts.ifname, "up", ns=name)
        except BaseException:
            hosts.close()
            raise
        return hosts

    @property
    def env(self) -> dict[str, str]:
        """What every process on these hosts needs: gloo must use the link, not the hostname's interface."""
        return {"GLOO_SOCKET_IFNAME": self.ifname}

    def wrap(self, host: int, cmd: list[str]) -> list[str]:
        """``cmd`` run on ``host``: in its namespace, under its own hostname."""
        return ["ip", "netns", "exec", self.names[host], "unshare", "--uts", "sh", "-c", 'hostname "$1"; shift; exec "$@"',
                "sh", self.hostnames[host], *cmd]

    def popen(self, host: int, cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        """Start ``cmd`` on ``host`` in a session of its own (so :meth:`kill_host` reaches all its children)."""
        env = {**env, **self.env}
        wrapped = self.wrap(host, cmd)
        out = open(log, "w")
        proc = subprocess.Popen(wrapped, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def pids(self, host: int) -> list[int]:
        """Every process living in ``host``'s network namespace (the launcher, its agents and its ranks)."""
        done = subprocess.run(["ip", "netns", "pids", self.names[host]], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def kill_host(self, host: int) -> None:
        """SIGKILL everything on ``host`` at once, as a node that loses power."""
        for pid in self.pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Kill what still runs in the namespaces, then delete them (which removes the veth pair with them)."""
        for host in range(len(self.names)):
            try:
                self.kill_host(host)
            except Exception:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except Exception:
                pass
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
