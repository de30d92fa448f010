"""Ray Jobs SDK: submit a vitlab command to a Ray cluster, follow its logs, and list, inspect or stop jobs.

``vitlab submit -- train jobs/x.yaml optim.lr=3e-4`` runs ``python -m vitlab.cli train jobs/x.yaml ...`` as a
Ray job. What travels with it (the runtime environment):

* ``working_dir``: a filtered copy of the local working directory (vitlab.upload: the repo without data,
  runs, MLflow stores, virtualenvs, .git and secrets), so job and search-space files resolve as they do locally;
* ``py_modules``: the vitlab package that is running this command, so the job driver and every Train worker,
  Tune trial and Ray Data task import the code you submitted, not an older copy installed on the nodes;
* ``env_vars``: tracking settings (``--tracking-uri`` -> MLFLOW_TRACKING_URI, ``--storage-path`` ->
  VITLAB_STORAGE_PATH, ``--env KEY=VALUE``) and the job id. Left out, the cluster's own values apply
  (cluster.yaml sets both on every node).

Token authentication is on by default for clusters started with ``ray start --head`` in Ray 2.60. The token
is taken from the standard places, in Ray's own order: ``$RAY_AUTH_TOKEN``, the file named by
``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` (``RAY_AUTH_MODE=disabled`` sends none). A missing or refused
token is one line saying where the token was looked for and how to get the right one (exit code 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from vitlab.errors import UserError
from vitlab.redact import redact
from vitlab.tracking import git_info
from vitlab.train.storage import STORAGE_ENV
from vitlab.upload import stage

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the head's dashboard, locally or through `ray dashboard cluster.yaml`
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
UNREACHABLE_GRACE_S = 60.0  # how long a follower waits for a head that stopped answering (a restart)
TOKEN_HELP = ("set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or copy the head node's "
              "~/.ray/auth_token here (`ray get-auth-token` on the head prints it)")


# ---------------------------------------------------------------------------------------------------------
# Address and token


@dataclass
class Token:
    value: str
    source: str  # where it came from, for error messages


def find_token() -> Token | None:
    """The cluster token from the standard places, in the order Ray's own loader uses."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return Token(value, "$RAY_AUTH_TOKEN")
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path_env:
        path = Path(path_env).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path_env}: cannot read the token file ({e.strerror})") from None
        if not value:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path_env}: the token file is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH={path_env}")
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        value = default.read_text().strip()
        if value:
            return Token(value, str(default))
    return None


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is a URL, else the local dashboard."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


@contextlib.contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Ray's SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; the address
    resolved here (which already took them into account) must win."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_error(address: str, token: Token | None, e: Exception) -> UserError:
    """Ray's AuthenticationError as one line: no token sent (or none accepted at all), or the wrong one."""
    if token is None or "Authentication required" in str(e):
        return UserError(f"the Ray cluster at {address} requires an authentication token and none was found: "
                         f"{TOKEN_HELP}")
    return UserError(f"the Ray cluster at {address} refused the token from {token.source}: it is not this "
                     f"cluster's token; {TOKEN_HELP}")


class ClusterUnreachable(UserError):
    """The job API stopped answering (the head went away, a tunnel closed)."""


class Jobs:
    """A JobSubmissionClient with vitlab's address and token rules and one-line errors."""

    def __init__(self, address: str | None = None):
        self.address = resolve_address(address)
        self.token = find_token()
        headers = {"Authorization": f"Bearer {self.token.value}"} if self.token else {}
        try:
            with _address_env_cleared():
                self.client = JobSubmissionClient(self.address, headers=headers)
        except AuthenticationError as e:
            raise _auth_error(self.address, self.token, e) from None
        except ConnectionError:
            raise UserError(f"no Ray cluster answers at {self.address} (start one with `ray up cluster.yaml`, "
                            "open a tunnel with `ray dashboard cluster.yaml`, or pass --address)") from None

    def call(self, method: str, *args, **kwargs):
        """One SDK call, with auth, unknown-job and connection errors turned into UserError."""
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except AuthenticationError as e:
            raise _auth_error(self.address, self.token, e) from None
        except OSError as e:  # requests' ConnectionError and timeouts are OSErrors
            raise self._unreachable(type(e).__name__) from None
        except RuntimeError as e:
            if "status code 404" in str(e) or "does not exist" in str(e):
                job = args[0] if args else kwargs.get("job_id", "")
                raise UserError(f"no job '{job}' on the Ray cluster at {self.address} (vitlab jobs list)") \
                    from None
            # a head going down or restarting answers 500 for a moment (a tunnel's proxy 502/503): waited for
            # like silence, and one line, not a traceback
            server_error = re.search(r"status code (5\d\d)", str(e))
            if server_error:
                raise self._unreachable(f"HTTP {server_error[1]}") from None
            raise

    def _unreachable(self, why: str) -> ClusterUnreachable:
        return ClusterUnreachable(f"the Ray cluster at {self.address} stopped answering ({why}); the job's state "
                                  "is unknown: check it with `vitlab jobs status` when the cluster is back")

    def dashboard_url(self, job_id: str) -> str:
        return f"{self.address}/#/jobs/{job_id}"


def parse_env(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item}: expected KEY=VALUE")
        out[key] = value
    return out


def job_env(job_id: str, tracking_uri: str | None = None, storage_path: str | None = None,
            env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables of the job's processes (driver and every worker)."""
    out = {"PYTHONUNBUFFERED": "1", "VITLAB_RAY_JOB_ID": job_id}
    if tracking_uri:
        out["MLFLOW_TRACKING_URI"] = tracking_uri
    if storage_path:
        out[STORAGE_ENV] = storage_path
    out.update(env or {})
    return out


def new_job_id(command: str) -> str:
    return f"vitlab-{command}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def submit(argv: list[str], address: str | None = None, working_dir: str | Path = ".", wait: bool = True,
           tracking_uri: str | None = None, storage_path: str | None = None, env: dict[str, str] | None = None,
           python: str = "python", job_id: str | None = None, include: tuple[str, ...] = (), out=None) -> int:
    """Submit ``vitlab <argv>`` (a command the CLI has checked) as a Ray job; with ``wait``, stream its logs
    until it ends. Returns the exit code: 0 only if the job SUCCEEDED (or, without ``wait``, was accepted)."""
    out = out or sys.stdout
    jobs = Jobs(address)
    job_id = job_id or new_job_id(argv[0])
    entrypoint = shlex.join([python, "-m", "vitlab.cli", *argv])
    with tempfile.TemporaryDirectory(prefix="vitlab-submit-") as tmp:
        wd, pkg, taken = stage(working_dir, Path(tmp), include)
        if taken.secrets:
            print(f"not uploaded (secrets; --include PATH sends one): {', '.join(taken.secrets)}", file=out)
        runtime_env: dict[str, Any] = {
            "working_dir": str(wd),
            "py_modules": [str(pkg)],
            "env_vars": job_env(job_id, tracking_uri, storage_path, env),
        }
        # the submitted code's commit: the working dir travels without .git
        metadata = {"vitlab.command": redact(shlex.join(argv)), **git_info(str(working_dir))}
        # The upload happens inside submit_job, so the staged copy may go when it returns.
        jobs.call("submit_job", entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                  metadata=metadata)
    print(f"submitted job {job_id} to {jobs.address}: {redact(entrypoint)}", file=out, flush=True)
    print(f"dashboard: {jobs.dashboard_url(job_id)}", file=out, flush=True)
    if not wait:
        print(f"follow it: vitlab jobs logs {job_id} --follow   stop it: vitlab jobs stop {job_id}", file=out)
        return 0
    return follow(jobs, job_id, out)


def follow(jobs: Jobs, job_id: str, out=None) -> int:
    """Stream a job's logs until it ends; print its final status last. 0 only if it SUCCEEDED."""
    out = out or sys.stdout
    start = time.time()

    async def tail() -> None:
        async for chunk in jobs.client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nvitlab: stopped following; job {job_id} goes on (vitlab jobs stop {job_id} ends it)",
              file=sys.stderr)
        raise
    except Exception as e:  # the log stream broke (head restarted, tunnel closed): fall back to polling
        log.warning("log stream of %s ended early (%s); polling its status", job_id, e)
    info = wait_until_done(jobs, job_id)
    status = _status(info)
    took = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else time.time() - start
    # Ray's message repeats the last logs after its first line; they were just streamed
    reason = (info.message or "").splitlines()[0].split(", last available logs")[0] if info.message else ""
    message = f": {reason}" if status != "SUCCEEDED" and reason else ""
    print(f"job {job_id} {status} after {took:.0f}s{message}", file=out, flush=True)
    return 0 if status == "SUCCEEDED" else 1


def wait_until_done(jobs: Jobs, job_id: str, timeout: float | None = None, poll: float = 1.0):
    """Poll the job until it ends (or ``timeout``); a head that stops answering for UNREACHABLE_GRACE_S (a
    restart) is waited for, then reported as one line."""
    deadline = None if timeout is None else time.time() + timeout
    answered = time.time()
    while True:
        try:
            info = jobs.call("get_job_info", job_id)
        except ClusterUnreachable:
            if time.time() - answered > UNREACHABLE_GRACE_S:
                raise
            time.sleep(poll)
            continue
        answered = time.time()
        if _status(info) in TERMINAL:
            return info
        if deadline is not None and time.time() > deadline:
            return info
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------------------
# jobs list / logs / status / stop


def _status(info) -> str:
    return str(getattr(info.status, "value", info.status))


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def list_jobs(address: str | None = None) -> str:
    """A table of the cluster's submitted jobs, newest first."""
    jobs = Jobs(address)
    rows = [j for j in jobs.call("list_jobs") if j.submission_id]
    rows.sort(key=lambda j: j.start_time or 0, reverse=True)
    table = [["job", "status", "started", "took", "entrypoint"]]
    for j in rows:
        took = f"{((j.end_time or time.time() * 1000) - j.start_time) / 1000:.0f}s" if j.start_time else "-"
        entry = j.entrypoint if len(j.entrypoint) <= 80 else j.entrypoint[:77] + "..."
        table.append([j.submission_id, _status(j), _when(j.start_time), took, entry])
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines) + f"\n{len(rows)} jobs on {jobs.address}"


def job_logs(job_id: str, address: str | None = None, follow_logs: bool = False, out=None) -> int:
    out = out or sys.stdout
    jobs = Jobs(address)
    if follow_logs:
        return follow(jobs, job_id, out)
    out.write(jobs.call("get_job_logs", job_id))
    return 0


def job_status(job_id: str, address: str | None = None) -> str:
    jobs = Jobs(address)
    info = jobs.call("get_job_info", job_id)
    message = f"  {info.message}" if info.message else ""
    return f"{job_id}  {_status(info)}  started {_when(info.start_time)}  ended {_when(info.end_time)}{message}"


def stop_job(job_id: str, address: str | None = None, timeout: float = 60.0) -> str:
    """Ask the job to stop (SIGTERM to its driver, then SIGKILL), and wait until it has."""
    jobs = Jobs(address)
    info = jobs.call("get_job_info", job_id)
    if _status(info) in TERMINAL:
        return f"job {job_id} had already ended: {_status(info)}"
    jobs.call("stop_job", job_id)
    info = wait_until_done(jobs, job_id, timeout=timeout)
    return f"job {job_id} {_status(info)}"
