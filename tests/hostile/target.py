"""The runner program under attack.

Run from the repository root::

    python -m tests.hostile.target MODE [--certs DIR] [--limits JSON]

``MODE`` is ``plain`` (no authentication), ``secret`` (the shared secret
:data:`~tests.hostile.app.SECRET`) or ``tls`` (TLS and the secret; a fresh
trustme CA whose certificate is written to ``DIR/ca.pem``, so attackers can
complete the TLS handshake like any peer would). ``--limits`` is a
:class:`~tests.hostile.app.Limits` as JSON.

Two runners share one :class:`~trio_cluster.MemoryStorage` in this process:
the *owner* hosts the ``Target`` entity and so owns every shard; the *caller*
hosts nothing, so each of its asks crosses the real socket between them. Both
listen on 127.0.0.1 and both are attacked (the caller for reply forging). The
caller is the legitimate traffic beside the attack: a test drives it with
commands on stdin (:data:`~tests.hostile.app.Command`, one JSON line each) and
reads the results on stdout, after the ``ready {json}`` line.

It runs until SIGTERM or SIGINT (or its stdin closes, so a dead test leaves no
orphan), then leaves both ``open_runner`` blocks and exits 0. Anything else
(an exception escaping a runner) exits 1 with the traceback on stderr, which
is exactly what the regressions look for.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import trio

from trio_cluster import (
    ClusterError,
    EntityContext,
    MemoryStorage,
    Runner,
    TransportConfig,
    open_runner,
    wait_for_termination,
)

from . import app
from .app import (
    CLUSTER,
    MODES,
    SECRET,
    Ack,
    Big,
    BigResult,
    Command,
    Limits,
    Mode,
    Probe,
    ProbeResult,
    Ready,
    Release,
    Slow,
    SlowDone,
    SlowInFlight,
    StartSlow,
    Target,
)

log = logging.getLogger("tests.hostile.target")


class Gates:
    """Named events shared by every entity of the process: how slow requests are held."""

    def __init__(self) -> None:
        self.opened: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.arrived: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.request_ids: dict[str, int] = {}
        """The request id each held request arrived with, as its handler sees it."""


GATES = Gates()


class TargetHandler:
    """The ``Target`` entity: stateless, so any number of activations is harmless to it."""

    def __init__(self, ctx: EntityContext) -> None:
        self.ctx = ctx

    @app.echo.handler
    async def echo(self, text: str) -> str:
        return text

    @app.sized.handler
    async def sized(self, size: int) -> bytes:
        return app.pattern(min(max(0, size), app.MAX_SIZED))

    @app.slow.handler
    async def slow(self, request: Slow) -> str:
        # The id an attacker who guessed it would hold: the caller's, as it came in.
        GATES.request_ids[request.gate] = self.ctx.request.request_id
        GATES.arrived[request.gate].set()
        await GATES.opened[request.gate].wait()
        return request.value

    @app.release.handler
    async def release(self, gate: str) -> None:
        GATES.opened[gate].set()

    @app.ticks.handler
    async def ticks(self, n: int) -> AsyncIterator[int]:
        i = 0
        while i != n:
            yield i
            i += 1


# -- configuration ---------------------------------------------------------------------


def tls_contexts(certs: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A fresh CA, a server certificate for 127.0.0.1, and a client trusting the CA."""
    import trustme  # noqa: PLC0415 - only the tls mode needs it

    ca = trustme.CA()
    certs.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def transport_config(mode: Mode, limits: Limits, certs: Path | None) -> TransportConfig:
    """The transport of both runners."""
    kwargs: dict[str, Any] = {
        "host": "127.0.0.1",
        "cluster": CLUSTER,
        "ping_interval": limits.ping_interval,
    }
    if mode != "plain":
        kwargs["secret"] = SECRET
    if mode == "tls":
        if certs is None:
            raise SystemExit("the tls mode needs --certs DIR")
        kwargs["tls_server"], kwargs["tls_client"] = tls_contexts(certs)
    for name in app.TRANSPORT_LIMITS:
        kwargs[name] = getattr(limits, name)
    return TransportConfig(**kwargs)


# -- the legitimate traffic --------------------------------------------------------------


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


async def run_probe(caller: Runner, command: Probe) -> ProbeResult:
    """``count`` echo asks from ``senders`` tasks, then one sized ask; every answer checked."""
    errors: list[str] = []
    latencies: list[int] = []
    numbers = iter(range(command.count))

    async def sender() -> None:
        for number in numbers:
            entity_id = f"legit-{number % 8}"
            text = f"{command.tag}-{number}-" + "x" * (number % 50)
            start = time.perf_counter_ns()
            try:
                answer = await caller.ask(app.echo, entity_id, text, timeout=command.timeout)
            except ClusterError as error:
                errors.append(f"echo {entity_id}: {_describe(error)}")
                continue
            latencies.append(time.perf_counter_ns() - start)
            if answer != text:
                errors.append(f"echo {entity_id}: answered {answer[:80]!r}, not {text[:80]!r}")

    async with trio.open_nursery() as nursery:
        for _ in range(command.senders):
            nursery.start_soon(sender)
    if command.size:
        try:
            data = await caller.ask(app.sized, "legit-sized", command.size, timeout=command.timeout)
        except ClusterError as error:
            errors.append(f"sized {command.size}: {_describe(error)}")
        else:
            if data != app.pattern(command.size):
                errors.append(f"sized {command.size}: {len(data)} wrong bytes")
    return ProbeResult(command.tag, errors, latencies)


async def run_slow(caller: Runner, command: StartSlow, write: Writer) -> None:
    """One slow ask: report its id once the owner's handler holds it, then its outcome."""
    sent_after_ms = time.time_ns() // 1_000_000
    done: SlowDone

    async def report_in_flight() -> None:
        await GATES.arrived[command.gate].wait()
        request_id = GATES.request_ids.get(command.gate)
        write(SlowInFlight(command.tag, request_id, sent_after_ms))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report_in_flight)
        try:
            result = await caller.ask(
                app.slow,
                command.entity_id,
                Slow(command.gate, command.value),
                timeout=command.timeout,
            )
        except ClusterError as error:
            done = SlowDone(f"{command.tag}/done", None, _describe(error))
        else:
            done = SlowDone(f"{command.tag}/done", result, None)
        nursery.cancel_scope.cancel()
    write(done)


async def run_big(caller: Runner, command: Big) -> BigResult:
    try:
        data = await caller.ask(app.sized, "legit-big", command.size, timeout=command.timeout)
    except ClusterError as error:
        return BigResult(command.tag, None, False, type(error).__name__)
    return BigResult(command.tag, len(data), data == app.pattern(command.size), None)


class Writer:
    """Results as JSON lines on stdout, the only thing printed there."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder()

    def __call__(self, result: msgspec.Struct) -> None:
        sys.stdout.write(self._encoder.encode(result).decode() + "\n")
        sys.stdout.flush()


async def control(caller: Runner, write: Writer, stop: trio.Event) -> None:
    """Run each command from stdin in its own task; stdin's end means stop."""
    decoder = msgspec.json.Decoder(Command)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = bytearray()
    async with stdin, trio.open_nursery() as nursery:
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer[:] = rest
                nursery.start_soon(execute, caller, decoder.decode(line), write)
        nursery.cancel_scope.cancel()
    stop.set()


async def execute(caller: Runner, command: Command, write: Writer) -> None:
    match command:
        case Probe():
            write(await run_probe(caller, command))
        case StartSlow():
            await run_slow(caller, command, write)
        case Release(tag, gate):
            GATES.opened[gate].set()
            write(Ack(tag))
        case Big():
            write(await run_big(caller, command))


# -- the program -----------------------------------------------------------------------------


async def serve(mode: Mode, limits: Limits, certs: Path | None) -> None:
    transport = transport_config(mode, limits, certs)
    config = app.sharding_config(limits)
    storage = MemoryStorage()
    stop = trio.Event()
    write = Writer()

    async def watch_signals() -> None:
        await wait_for_termination()
        stop.set()

    async with trio.open_nursery() as nursery:
        # Listening before the runners start: a SIGTERM while they start is a stop.
        nursery.start_soon(watch_signals)
        async with (
            open_runner(
                Target.implement(TargetHandler), storage=storage, config=config, transport=transport
            ) as owner,
            open_runner(storage=storage, config=config, transport=transport) as caller,
        ):
            await owner.settled()
            await caller.settled()
            # The caller's link to the owner is up before any attack: what the attacks
            # must not disturb is an established link, not the race to dial one.
            await caller.ask(app.echo, "warm-up", "warm-up")
            ready = Ready(
                pid=os.getpid(),
                mode=mode,
                owner=owner.address,
                caller=caller.address,
                owner_machine=owner.machine_id,
                caller_machine=caller.machine_id,
            )
            print("ready " + msgspec.json.encode(ready).decode(), flush=True)
            async with trio.open_nursery() as commands:
                commands.start_soon(control, caller, write, stop)
                await stop.wait()
                commands.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.hostile.target")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--certs", type=Path, help="directory for ca.pem (tls mode)")
    parser.add_argument("--limits", default="{}", help="a Limits as JSON")
    args = parser.parse_args(argv)
    limits = msgspec.json.decode(args.limits, type=Limits)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(serve, args.mode, limits, args.certs)


if __name__ == "__main__":
    main(sys.argv[1:])
