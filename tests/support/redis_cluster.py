"""A real 3-master Redis Cluster on loopback ports, started and removed by the tests (and bench).

No replicas: a killed master's slots are down until it is restarted from its cluster config
file (its node id and slots survive; with `--save ''` its keys do not, as after a failover to a
replica that had not caught up). `cluster-require-full-coverage no` keeps the other shards
serving meanwhile. Every wait here is bounded and fails loudly.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int, start: int) -> list[int]:
    """`count` ports from `start` whose cluster-bus port (+10000) is free too."""
    found: list[int] = []
    for port in range(start, start + 400):
        if _port_free(port) and _port_free(port + 10000):
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError(f"no {count} free port pairs from {start}")


def _command(port: int, *args: str, limit: float = 1.0) -> str:
    """One redis-cli command against a node; its output ("" if the node does not answer)."""
    try:
        done = subprocess.run(
            ["redis-cli", "-h", HOST, "-p", str(port), *args],
            capture_output=True,
            timeout=limit,
            text=True,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout if done.returncode == 0 else ""


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


class RedisClusterProcesses:
    """Three `redis-server --cluster-enabled yes` masters covering all 16384 slots."""

    def __init__(self, first_port: int = 7100, masters: int = 3) -> None:
        self.ports = _free_ports(masters, first_port)
        self.dir = Path(tempfile.mkdtemp(prefix="keyedlock-cluster-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.ports[0]}/0"

    def start(self, limit: float = 30.0) -> RedisClusterProcesses:
        deadline = time.monotonic() + limit
        try:
            for port in self.ports:
                self._spawn(port)
            for port in self.ports:
                self._wait_answering(port, deadline)
            created = subprocess.run(
                ["redis-cli", "--cluster", "create"]
                + [f"{HOST}:{port}" for port in self.ports]
                + ["--cluster-yes"],
                capture_output=True,
                timeout=max(deadline - time.monotonic(), 1.0),
                text=True,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]}")
            self.wait_healthy(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, port: int) -> None:
        self.procs[port] = subprocess.Popen(
            [
                "redis-server",
                "--port", str(port),
                "--bind", HOST,
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "1000",
                "--cluster-require-full-coverage", "no",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(self.dir / f"redis-{port}.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _wait_answering(self, port: int, deadline: float) -> None:
        while "PONG" not in _command(port, "PING"):
            if self.procs[port].poll() is not None:
                raise RuntimeError(f"redis-server on {port} exited ({self.procs[port].returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {port} did not answer in time")
            time.sleep(0.02)

    def wait_healthy(self, limit: float = 20.0) -> None:
        """Until every node reports the cluster ok with all slots assigned and served."""
        deadline = time.monotonic() + limit
        while True:
            infos = [_command(port, "CLUSTER", "INFO") for port in self.ports]
            if all(
                "cluster_state:ok" in info
                and "cluster_slots_ok:16384" in info
                and f"cluster_known_nodes:{len(self.ports)}" in info
                for info in infos
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not become healthy: {infos}")
            time.sleep(0.05)

    def node_of_slot(self, slot: int) -> int:
        """The port of the master serving `slot`."""
        for line in _command(self.ports[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2]:
                continue
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split(":")[1].split("@")[0])
        raise LookupError(f"no master serves slot {slot}")

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(timeout=10)

    def restart(self, port: int, limit: float = 20.0) -> None:
        """Start a killed master again from its config file: it rejoins with its slots."""
        self._spawn(port)
        self._wait_answering(port, time.monotonic() + limit)
        self.wait_healthy(limit)

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
