"""``herder serve`` as a child process of a chaos run: started, SIGKILLed, started again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from herder.app.client import Client, ClientError, read_client_file


class ServeProcess:
    """One dispatcher process at a time, started with ``args`` and reached through the
    client.json it writes into ``data_dir``.

    ``log_path()`` names the file the next start logs to (a harness may give each start its
    own).  The process runs in its own session, so :meth:`force_stop` can take its whole
    process group.
    """

    def __init__(self, args: list[str], data_dir: Path, log_path: Callable[[], Path]) -> None:
        self.args = args
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Client | None = None
        self.started_at = 0.0

    def start(self, timeout: float = 60.0) -> Client:
        """Start it and wait until its API answers; a process that dies or hangs is an error
        that quotes its log."""
        (self.data_dir / "client.json").unlink(missing_ok=True)
        env = {**os.environ, "HERDER_DATA_DIR": str(self.data_dir)}
        with open(self.log_path(), "ab") as log:
            self.proc = subprocess.Popen(
                self.args, env=env, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"herder serve exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            endpoint = read_client_file(self.data_dir)
            if endpoint is not None:
                client = Client.from_endpoint(endpoint, timeout=10)
                with contextlib.suppress(ClientError):
                    client.health()
                    self.client = client
                    self.started_at = time.monotonic()
                    return client
            time.sleep(0.05)
        raise RuntimeError(f"herder serve did not start:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL: no handler runs, nothing is flushed or closed.  Its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.client = None
        return self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """Stop it as an operator does (SIGTERM); its exit status (-9 if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.kill()
        finally:
            self.client = None

    def force_stop(self) -> None:
        """Whatever state it is in, it is gone afterwards (the process group, by its id)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path().read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""
