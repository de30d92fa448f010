"""A real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts served by the server), which a test can stop
and start again on the same port and store: a tracking-server outage."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support import BIN
from tests.support.raycluster import free_ports


class MlflowServer:
    """``artifacts``: where the server keeps artifacts (proxied: clients send them through the server, and hold
    no storage credentials), default a folder under ``root``. ``admin_password``: basic-auth on, with an admin
    user ``admin`` of that password created at the first start."""

    def __init__(self, root: Path, artifacts: str | None = None, admin_password: str | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None
        self.artifacts = artifacts or str(self.root / "artifacts")
        self.admin_password = admin_password

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", self.artifacts]
        # no job-runner processes (about 8): vitlab submits no MLflow jobs, and they triple the start-up here
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        if self.admin_password:
            ini = self.root / "basic_auth.ini"
            ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.root / 'auth.db'}\n"
                           "admin_username = admin\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            cmd += ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password,
                       MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not up in {timeout:.0f}s")

    def stop(self) -> None:
        """SIGKILL the server's whole process group: an outage, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
