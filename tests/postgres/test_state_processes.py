"""Durable state across real runner processes: SIGKILL under traffic, and a paused stale owner.

The runners are ``tests.postgres.state_app`` processes (a ``Wallet`` whose
state is its balance and the keys it applied); the tests send through an
in-test client runner that hosts nothing. Every check is made from outside
the runners: the stored state, the stored replies, what the client was told.
Processes are waited for by their ``ready`` line or their exit, handlers by
the NOTIFYs they send, a stopped runner's lease by its backend leaving the
server (``pg_terminate_backend`` with a timeout waits for that, server-side).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import msgspec
import trio

from trio_cluster import ClusterError, Runner, SendTimeout, TransportConfig, open_runner
from trio_cluster.pgdriver import Connection, open_connection
from trio_cluster.postgres.storage import PostgresStorage, open_postgres_storage

from .state_app import (
    COMPLETED,
    CONFIG,
    ENTERED,
    Credit,
    WalletState,
    channel,
    credit,
    release_channel,
)

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0
WALLETS = [f"w{n}" for n in range(12)]


@attrs.define
class Node:
    process: trio.Process
    address: str
    machine_id: int


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError(f"stream ended before a full line: {bytes(buffer)!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


class Processes:
    """Runner processes of one test; whatever is alive at the end is killed."""

    def __init__(self, dsn: str, prefix: str, app: str = "tests.postgres.state_app") -> None:
        self.dsn = dsn
        self.prefix = prefix
        self.app = app
        self.all: list[trio.Process] = []

    async def start(self, mode: str | None = "serve") -> Node:
        """Start the app (with ``mode`` as its last argument, unless None), until ready."""
        modes = [] if mode is None else [mode]
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", self.app, self.dsn, self.prefix, *modes],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        self.all.append(process)
        assert process.stdout is not None
        with trio.fail_after(WAIT_S):
            word, address, machine_id = (await read_line(process.stdout, bytearray())).split()
        assert word == "ready"
        return Node(process, address, int(machine_id))

    async def stop(self, node: Node) -> None:
        node.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_S):
            assert await node.process.wait() == 0

    async def cleanup(self) -> None:
        with trio.CancelScope(shield=True):
            for process in self.all:
                if process.returncode is None:
                    process.kill()
                await process.wait()
                assert process.stdout is not None
                await process.stdout.aclose()


@attrs.define
class World:
    prefix: str
    conn: Connection
    listener: Connection
    storage: PostgresStorage
    client: Runner
    processes: Processes

    async def wait_for(self, expected: tuple[str, str, int]) -> None:
        """Until a handler announces ``(phase, key, pid)``."""
        with trio.fail_after(WAIT_S):
            while True:
                notification = await self.listener.wait_notification()
                phase, key, pid = notification.payload.split(":")
                if (phase, key, int(pid)) == expected:
                    return

    async def states(self) -> dict[str, WalletState]:
        rows = await self.conn.fetch(
            f"SELECT entity_id, data FROM {self.prefix}states WHERE entity_type = 'Wallet'"
        )
        return {str(i): msgspec.msgpack.decode(data, type=WalletState) for i, data in rows}

    async def backend_gone(self, machine_id: int) -> None:
        """Until the server has ended that runner's lock session, freeing its leases."""
        pid = await self.conn.fetchval(
            f"SELECT lock_pid FROM {self.prefix}runners WHERE machine_id = $1", [machine_id]
        )
        assert pid is not None
        with trio.fail_after(WAIT_S):
            await self.conn.execute("SELECT pg_terminate_backend($1, $2)", [pid, 15_000])


@asynccontextmanager
async def open_world(dsn: str, name: str) -> AsyncIterator[World]:
    prefix = f"{name}_{uuid.uuid4().hex[:8]}_"
    processes = Processes(dsn, prefix)
    try:
        async with (
            open_connection(dsn) as conn,
            open_connection(dsn) as listener,
            open_postgres_storage(dsn, prefix=prefix, pool_size=4) as storage,
            open_runner(
                storage=storage, config=CONFIG, transport=TransportConfig(cluster=prefix)
            ) as client,
        ):
            await listener.listen(channel(prefix))
            yield World(prefix, conn, listener, storage, client, processes)
    finally:
        await processes.cleanup()


async def test_after_sigkill_each_state_is_the_fold_of_its_acknowledged_credits(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "fold") as world:
        nodes = [await world.processes.start() for _ in range(3)]
        acknowledged: dict[str, tuple[str, int]] = {}
        victim = nodes[0]
        killed = trio.Event()

        async def sender(number: int) -> None:
            for n in range(60):
                key = f"s{number}-{n}"
                wallet = WALLETS[(number * 7 + n) % len(WALLETS)]
                for _ in range(5):  # a timeout is asked again, with the same key
                    try:
                        await world.client.ask(credit, wallet, Credit(key, n + 1), timeout=5.0)
                    except SendTimeout:
                        continue
                    except ClusterError:
                        await trio.sleep(0.1)  # a backoff before asking again
                        continue
                    acknowledged[key] = (wallet, n + 1)
                    break
                if number == 0 and n == 20:
                    victim.process.kill()
                    killed.set()

        async with trio.open_nursery() as nursery:
            for number in range(4):
                nursery.start_soon(sender, number)
        assert killed.is_set()
        with trio.fail_after(WAIT_S):
            assert await victim.process.wait() == -signal.SIGKILL
        for node in nodes[1:]:
            await world.processes.stop(node)

        states = await world.states()
        for wallet in WALLETS:
            mine = {key: amount for key, (owner, amount) in acknowledged.items() if owner == wallet}
            state = states.get(wallet, WalletState())
            assert Counter(state.applied) == Counter(mine.keys()), wallet
            assert state.balance == sum(mine.values()), wallet
        assert len(acknowledged) == 4 * 60
        unprocessed = await world.conn.fetchval(
            f"SELECT count(*) FROM {world.prefix}messages WHERE NOT processed"
        )
        assert unprocessed == 0


async def test_a_runner_paused_past_its_lease_cannot_overwrite_the_new_owners_state(
    pg_dsn: str,
) -> None:
    async with open_world(pg_dsn, "paused") as world:
        stale = await world.processes.start("hold")
        # Its state before: one credit, committed.
        await world.client.tell(credit, "w0", Credit("before", 5))
        await world.wait_for((ENTERED, "before", stale.process.pid))
        await world.conn.execute("SELECT pg_notify($1, 'release')", [release_channel(world.prefix)])
        with trio.fail_after(WAIT_S):
            assert await world.client.ask(credit, "w0", Credit("before", 0)) == 5
        # "held" is applied to its in-memory state, then held; the runner is paused.
        await world.client.tell(credit, "w0", Credit("held", 100))
        await world.wait_for((ENTERED, "held", stale.process.pid))
        stale.process.send_signal(signal.SIGSTOP)
        await world.backend_gone(stale.machine_id)

        # A new owner runs "held" on the committed state, and commits it.
        fresh = await world.processes.start("serve")
        await world.wait_for((COMPLETED, "held", fresh.process.pid))
        # A duplicate waits for the original's stored reply: then its state is committed.
        with trio.fail_after(WAIT_S):
            assert await world.client.ask(credit, "w0", Credit("held", 0)) == 105
        assert (await world.states())["w0"] == WalletState(105, ["before", "held"])

        # The paused runner resumes, and its held run is let go: whether it ends
        # cancelled (its lease found lost) or returns and tries to store its reply
        # and state under the stale lease (refused), its change is discarded.
        stale.process.send_signal(signal.SIGCONT)
        await world.conn.execute("SELECT pg_notify($1, 'release')", [release_channel(world.prefix)])
        await world.processes.stop(stale)
        await world.processes.stop(fresh)
        assert (await world.states())["w0"] == WalletState(105, ["before", "held"])
        replies: defaultdict[str, int] = defaultdict(int)
        for key in ("before", "held"):
            replies[key] = await world.client.ask(credit, "w0", Credit(key, 0))
        assert dict(replies) == {"before": 5, "held": 105}
