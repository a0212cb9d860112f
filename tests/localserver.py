"""Run azmlinfsrv over score.py in a child process, as `make serve` does: for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`with LocalServer(model_dir, log_path, env) as server:` serves at `server.url` until the block ends."""

    def __init__(self, model_dir: Path, log_path: Path, env: dict[str, str] | None = None, threads: int = 24,
                 entry_script: Path = ROOT / "score.py") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environ = {**os.environ, "GUNICORN_CMD_ARGS": f"--threads {threads}", **(env or {}),
                   "AZUREML_MODEL_DIR": str(model_dir)}
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "azmlinfsrv"), "--entry_script", str(entry_script),
             "--port", str(self.port)],
            cwd=ROOT, env=environ, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> bool:
        """True once the health probe answers; False if the server exited first (init failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/", timeout=5) as response:
                    if response.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"azmlinfsrv at {self.url} not ready after {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the worker too: it runs in the server's session
            self.process.wait(timeout=20)
        self._log.close()

    def __enter__(self) -> LocalServer:
        if not self.wait_ready():
            self.stop()
            raise RuntimeError(f"azmlinfsrv exited during start-up:\n{self.log_path.read_text()[-4000:]}")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
