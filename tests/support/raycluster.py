"""Real Ray clusters for tests: a head started with `ray start --head` (token authentication on, everything on
127.0.0.1, its own temp dir and ports), and clean-up that ends only the processes it started."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support import BIN as VENV_BIN


def free_ports(n: int) -> list[int]:
    """n distinct ports nobody listens on now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), from /proc (Linux; no psutil in the venv outside Ray's own copy)."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(d.name)] = (ppid, cmdline)
    return table


def descendants(pids: set[int], table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    table = table if table is not None else _proc_table()
    found, frontier = set(pids), set(pids)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


def processes_under(temp_dir: str) -> set[int]:
    """PIDs of processes whose command line names ``temp_dir`` (Ray's daemons do), and their descendants
    (workers, job drivers)."""
    table = _proc_table()
    found = descendants({pid for pid, (_, cmd) in table.items() if temp_dir in cmd}, table)
    found.discard(os.getpid())
    return found


def kill_under(temp_dir: str, pids: set[int] | list[int] = ()) -> None:
    """SIGKILL what we started: the given PIDs, processes naming our temp dir, and their descendants."""
    targets = descendants(set(pids)) | processes_under(temp_dir)
    targets.discard(os.getpid())
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in targets):
        time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def short_temp_dir(prefix: str) -> str:
    """Ray's Unix sockets live under the temp dir, and socket paths are limited to ~107 bytes."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@dataclass
class Head:
    temp_dir: str
    token: str
    token_file: Path
    dashboard_port: int
    gcs_port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a client holding this cluster's token (and no Ray address of its own)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}, **extra)
        return env

    def stop(self) -> None:
        """SIGTERM to `ray start --block` stops what it started; then kill anything left that we started."""
        tree = descendants({self.proc.pid})
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        kill_under(self.temp_dir, tree)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 2, timeout: float = 120.0, num_gpus: int = 0, resources: dict | None = None,
               extra_args: Callable[[Path, int], list[str]] | None = None, extra_env: dict[str, str] | None = None,
               prefix: str = "vrh") -> Head:
    """`ray start --head --block` from the project's virtualenv, as a user with the venv activated would:
    token authentication on (a fresh token in a file of its own), dashboard and job API on 127.0.0.1.
    ``extra_args(temp_dir, gcs_port)`` adds arguments that need the head's own folder or port (an autoscaling
    config); ``extra_env`` adds variables."""
    temp_dir = short_temp_dir(prefix)
    token = secrets.token_hex(32)
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(token)
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "VITLAB_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), PATH=f"{VENV_BIN}:{env['PATH']}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **(extra_env or {}))
    log = Path(temp_dir) / "ray_start.log"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(env_agent), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--temp-dir", temp_dir, "--num-cpus", str(num_cpus),
           "--num-gpus", str(num_gpus), "--disable-usage-stats"]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    if extra_args:
        cmd += extra_args(Path(temp_dir), gcs)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=temp_dir,
                                start_new_session=True)
    head = Head(temp_dir, token, token_file, dash, gcs, proc, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            text = log.read_text()[-3000:]
            head.stop()
            raise RuntimeError(f"ray start exited {proc.returncode}: {text}")
        try:
            req = urllib.request.Request(f"{head.url}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return head
        except OSError:
            pass
        time.sleep(0.5)
    text = log.read_text()[-3000:]
    head.stop()
    raise RuntimeError(f"the Ray head did not answer on {head.url} in {timeout:.0f}s: {text}")
