"""`--spawn`: the hotswap server as a child process on the bench model."""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 30.0
LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class ServerOptions:
    model_dir: Path
    adapters: dict[str, Path]
    threads: int = 2
    max_batch_size: int = 64
    max_resident_adapters: int = 8
    host: str = "127.0.0.1"
    repo: Path = REPO_ROOT  # the checkout whose `server` package runs (load_tests.ab compares two)
    extra: tuple[str, ...] = ()  # more server flags, e.g. ("--prefill-chunk-tokens", "4096")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_command(options: ServerOptions, store: Path, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "server",
        "--model", str(options.model_dir),
        "--store", str(store),
        "--host", options.host,
        "--port", str(port),
        "--threads", str(options.threads),
        "--max-batch-size", str(options.max_batch_size),
        "--max-resident-adapters", str(options.max_resident_adapters),
    ]
    for name, folder in options.adapters.items():
        command += ["--adapter", f"{name}={folder}"]
    return command + list(options.extra)


class SpawnedServer:
    """Starts the server in a scratch store; stops it (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, options: ServerOptions) -> None:
        self._options = options
        self._scratch = tempfile.TemporaryDirectory(prefix="hotswap-bench-")
        self._log_path = Path(self._scratch.name) / "server.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> SpawnedServer:
        port = free_port(self._options.host)
        command = server_command(self._options, Path(self._scratch.name) / "store", port)
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(command, cwd=self._options.repo, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://{self._options.host}:{port}"
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._scratch.cleanup()

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def log_tail(self) -> str:
        return self._log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if self._log_path.exists() else ""
