"""A throwaway PgBouncer in front of the test server, for the pooled storage's tests.

Started as the ``postgres`` OS user when this process is root (PgBouncer, like
PostgreSQL, refuses to run as root), in the foreground, and ready once it says
so on its output: no polling of its port.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

READY_S = 30.0


class ThrowawayPgBouncer:
    """PgBouncer in ``pool_mode`` for the server at ``target_dsn``, on 127.0.0.1."""

    def __init__(self, target_dsn: str, *, pool_mode: str = "transaction", pool_size: int = 4):
        self._target = urlsplit(target_dsn)
        self._pool_mode = pool_mode
        self._pool_size = pool_size
        self._base: Path | None = None
        self._process: subprocess.Popen[str] | None = None
        self._port: int | None = None
        self._run_as = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.log: list[str] = []

    @property
    def dsn(self) -> str:
        """The target's DSN, through the pooler."""
        assert self._port is not None, "not started"
        user = self._target.username or "postgres"
        return f"postgresql://{user}@127.0.0.1:{self._port}{self._target.path}"

    def __enter__(self) -> Self:
        base = Path(tempfile.mkdtemp(prefix="trio_cluster_pgbouncer_"))
        self._base = base
        with socket.socket() as probe:  # racy, like any free port; a clash fails loudly
            probe.bind(("127.0.0.1", 0))
            self._port = probe.getsockname()[1]
        user = self._target.username or "postgres"
        (base / "users.txt").write_text(f'"{user}" ""\n')
        (base / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={self._target.hostname} port={self._target.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self._port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {base / 'users.txt'}\n"
            f"pool_mode = {self._pool_mode}\ndefault_pool_size = {self._pool_size}\n"
            "max_client_conn = 1000\n"
        )
        if self._run_as is not None:
            for path in (base, base / "users.txt", base / "pgbouncer.ini"):
                os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start(self) -> None:
        """Start (again, on the same port) and wait until it accepts connections."""
        assert self._base is not None and self._process is None
        argv = [_binary(), str(self._base / "pgbouncer.ini")]
        if self._run_as is not None:
            argv = ["runuser", "-u", self._run_as.pw_name, "--", *argv]
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._process = process
        ready = threading.Event()
        threading.Thread(target=self._read_output, args=(process, ready), daemon=True).start()
        if not ready.wait(READY_S) or process.poll() is not None:
            self.stop()
            raise RuntimeError("pgbouncer did not start:\n" + "\n".join(self.log[-20:]))

    def stop(self) -> None:
        """Stop it: its clients' connections drop, and new ones are refused."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _read_output(self, process: subprocess.Popen[str], ready: threading.Event) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.log.append(line.rstrip())
            if "process up" in line:
                ready.set()
        ready.set()  # it ended: the caller sees it has exited

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._base is not None:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None


def _binary() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if found is None:
        raise FileNotFoundError("pgbouncer is not installed (.ci/run installs it)")
    return found
