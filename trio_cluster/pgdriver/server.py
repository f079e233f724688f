"""A throwaway PostgreSQL server for tests, demos and benchmarks.

Synchronous and stdlib-only on purpose: it is driven from pytest fixtures, a CLI and
benchmark scripts, none of which should need an event loop just to get a database.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

__all__ = ["ShutdownMode", "ThrowawayPostgres"]

ShutdownMode = Literal["smart", "fast", "immediate"]

_SUPERUSER = "postgres"
_RUN_AS_WHEN_ROOT = "postgres"
_START_ATTEMPTS = 5
_PG_CTL_TIMEOUT_S = 60


def _find_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server binaries off PATH.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]
    raise FileNotFoundError(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin")


def _free_port() -> int:
    # Racy by nature (the port is released before postgres binds it); start() retries.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary directory, listening on 127.0.0.1.

    ``stop()`` deletes everything; ``stop(keep_data=True)`` followed by ``start()``
    simulates an outage without losing data or changing the DSN. If the process ends
    without ``stop()``, an ``atexit`` hook (Ctrl-C) or, failing that, a small watcher
    process (SIGTERM, SIGKILL) stops the server and deletes it.

    PostgreSQL refuses to run as root, so when this process is root the server runs as
    the ``postgres`` OS user.

    Unless *durable*, crash safety is traded for speed (fsync, synchronous_commit and
    full_page_writes off). *settings* adds or overrides server settings, with values
    written as in postgresql.conf (``{"log_statement": "'all'"}``).
    """

    def __init__(self, *, durable: bool = False, settings: dict[str, str] | None = None) -> None:
        self._durable = durable
        self._extra_settings = dict(settings or {})
        self._base: Path | None = None
        self._port: int | None = None
        self._running = False
        self._reaper: subprocess.Popen[bytes] | None = None
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(_RUN_AS_WHEN_ROOT)
            except KeyError:
                raise RuntimeError(
                    f"PostgreSQL refuses to run as root and there is no {_RUN_AS_WHEN_ROOT!r}"
                    " OS user to run it as"
                ) from None

    # -- public API -----------------------------------------------------------------

    @property
    def dsn(self) -> str:
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self._port}/postgres"

    @property
    def running(self) -> bool:
        return self._running

    @property
    def directory(self) -> Path | None:
        """The temporary directory (data, socket, ``postgres.log``), None once removed."""
        return self._base

    def start(self) -> None:
        """Create the cluster if needed, then start it and wait until it accepts connections."""
        if self._running:
            return
        if self._base is None:
            atexit.register(self._cleanup_at_exit)
            try:
                self._create_cluster()
                self._start_reaper()
                self._start_on_fresh_port()
            except BaseException:
                self._remove_cluster()  # the error message carries the server log's tail
                raise
        else:
            self._pg_ctl("start", "-l", str(self._logfile))
        self._running = True

    def stop(self, *, mode: ShutdownMode = "fast", keep_data: bool = False) -> None:
        """Stop the server; unless *keep_data*, also delete the cluster (the DSN dies too)."""
        try:
            if self._running:
                self._running = False
                self._pg_ctl("stop", "-m", mode)
        finally:
            if not keep_data:
                self._remove_cluster()

    def restart(self, mode: ShutdownMode = "fast") -> None:
        """Restart in place: every client connection is dropped, the DSN stays valid."""
        if not self._running:
            raise RuntimeError("the server is not running")
        self._pg_ctl("restart", "-m", mode, "-l", str(self._logfile))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------

    @property
    def _datadir(self) -> Path:
        assert self._base is not None
        return self._base / "data"

    @property
    def _logfile(self) -> Path:
        assert self._base is not None
        return self._base / "postgres.log"

    def _create_cluster(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="trio_cluster_pg_"))
        self._base = base
        if self._run_as is not None:
            os.chown(base, self._run_as.pw_uid, self._run_as.pw_gid)
        self._run(
            _find_binary("initdb"),
            "-D",
            str(self._datadir),
            "-U",
            _SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )

    def _start_on_fresh_port(self) -> None:
        for attempt in range(_START_ATTEMPTS):
            self._port = _free_port()
            self._write_settings()
            try:
                self._pg_ctl("start", "-l", str(self._logfile))
            except RuntimeError:
                if attempt + 1 == _START_ATTEMPTS or "could not bind" not in self._log_tail():
                    raise
            else:
                return

    def _write_settings(self) -> None:
        assert self._base is not None
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self._port),
            "unix_socket_directories": f"'{self._base}'",
            "max_connections": "200",
            "max_locks_per_transaction": "256",
            "shared_buffers": "'32MB'",
            "log_min_messages": "warning",
        }
        if not self._durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        settings |= self._extra_settings
        # postgresql.auto.conf is read last, so rewriting it wins over earlier attempts.
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        (self._datadir / "postgresql.auto.conf").write_text(text)

    def _pg_ctl(self, *args: str) -> None:
        self._run(
            _find_binary("pg_ctl"),
            *args,
            "-D",
            str(self._datadir),
            "-w",
            "-t",
            str(_PG_CTL_TIMEOUT_S),
        )

    def _as_server_user(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        if self._run_as is None:
            return argv
        if shutil.which("runuser"):
            return ("runuser", "-u", self._run_as.pw_name, "--", *argv)
        return ("su", self._run_as.pw_name, "-s", "/bin/sh", "-c", shlex.join(argv))

    def _run(self, *argv: str) -> None:
        argv = self._as_server_user(argv)
        result = subprocess.run(
            argv,
            cwd=self._base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(argv)} failed with exit code {result.returncode}\n"
                f"{result.stdout}{result.stderr}{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        if self._base is None:
            return ""
        try:
            lines = self._logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(["-- server log (tail) --", *lines[-20:]])

    def _start_reaper(self) -> None:
        """A watcher process that stops the server and deletes it if we die.

        atexit does not run when this process is killed (a CI timeout's SIGTERM, SIGKILL),
        and a leaked postmaster keeps its port and memory until someone notices.
        """
        assert self._base is not None
        stop = self._as_server_user(
            (_find_binary("pg_ctl"), "stop", "-D", str(self._datadir), "-m", "immediate")
        )
        script = (
            f'while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "$@" >/dev/null 2>&1; '
            f"rm -rf {shlex.quote(str(self._base))}"
        )
        self._reaper = subprocess.Popen(
            ("/bin/sh", "-c", script, "reaper", *stop),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives a Ctrl-C sent to our process group
        )

    def _stop_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.kill()
            reaper.wait()

    def _remove_cluster(self) -> None:
        self._stop_reaper()
        base, self._base, self._port = self._base, None, None
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
        atexit.unregister(self._cleanup_at_exit)

    def _cleanup_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(mode="immediate")


def main() -> None:
    """``python -m trio_cluster.pgdriver.server``: run a server until Ctrl-C or SIGTERM."""

    def exit_on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the with-block, which stops the server

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with ThrowawayPostgres() as server:
        print(server.dsn, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
