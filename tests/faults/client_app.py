"""The client process of the fault schedules: traffic through a client-only runner.

Run from the repository root::

    python -m tests.faults.client_app DSN PREFIX INCARNATION SEED

It opens a runner that hosts nothing (so it owns no shard, and every
request crosses to a runner process) and sends, until told to drain:

- persisted asks, each with a primary key used nowhere else (``a<incarnation>-...``);
  a timeout or a failure is asked again with the same key until answered,
  and now and then an answered key is asked once more (a duplicate, which
  must get the same answer from storage);
- persisted tells with unique keys (``t<incarnation>-...``), sent again
  with the same key until accepted;
- volatile asks, counted (they may fail during faults; a wrong answer is
  printed as ``bad``).

It prints one line per acknowledged persisted request, ``ack <key>
<entity> <pid> <run>`` for an ask (the answering run's process and id) and
``ack <key> <entity> 0 -`` for a tell, so that what was acknowledged is
known outside this process, where no fault reaches it. Duplicates print
``again`` lines of the same shape.

Commands on standard input: ``probe`` asks every traffic entity once,
volatile and persisted, within ``PROBE_BOUND_S`` each (``probe ...``
lines, then ``probed``); ``drain`` stops starting requests, lets every
one under way be answered and prints ``drained <stats>``. SIGTERM or the
end of standard input leaves the runner gracefully and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from collections import Counter

import trio

from trio_cluster import ClusterError, Runner, SendTimeout, open_runner, wait_for_termination
from trio_cluster.postgres.storage import open_postgres_storage

from .common import CONFIG, ENTITIES, LEASE_TIMING, Echo, Outcome, Post, echo, post, transport

ASK_SENDERS = 3
ASK_TIMEOUT_S = 3.0
"""An ask unanswered for this long is asked again with the same key."""
ASK_PACE_S = 0.02
TELL_PACE_S = 0.05
VOLATILE_PACE_S = 0.02
"""Pacing of each sender: traffic a 2-core machine keeps up with under faults."""
ERROR_BACKOFF_S = 0.2
AGAIN_PROBABILITY = 0.1
GIVE_UP_AFTER = 100
"""Consecutive failures (not timeouts) of one request before it is reported and dropped."""
PROBE_BOUND_S = 5.0
"""The bound of the invariant: every entity answers within 5 s of healing."""


def out(line: str) -> None:
    print(line, flush=True)


class Traffic:
    """The senders, their counts, and the two commands."""

    def __init__(self, client: Runner, incarnation: int, rng: random.Random) -> None:
        self.client = client
        self.incarnation = incarnation
        self.rng = rng
        self.draining = False
        self.timeouts = 0
        self.errors: Counter[str] = Counter()
        self.volatile: Counter[str] = Counter()
        self.acked = Counter[str]()
        self.probe_rounds = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for number in range(ASK_SENDERS):
                nursery.start_soon(self._ask_sender, number)
            nursery.start_soon(self._tell_sender)
            nursery.start_soon(self._volatile_sender)

    def stats(self) -> str:
        return json.dumps(
            {
                "acked": dict(self.acked),
                "timeouts": self.timeouts,
                "errors": dict(self.errors),
                "volatile": dict(self.volatile),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    async def ask(self, key: str, entity_id: str, deadline: float | None = None) -> Outcome | None:
        """Ask until answered (or until ``deadline``), always with the same key."""
        failures = 0
        while deadline is None or trio.current_time() < deadline:
            timeout = ASK_TIMEOUT_S
            if deadline is not None:
                timeout = min(timeout, max(deadline - trio.current_time(), 0.001))
            try:
                return await self.client.ask(post, entity_id, Post(key), timeout=timeout)
            except SendTimeout:
                self.timeouts += 1
            except ClusterError as error:
                self.errors[type(error).__name__] += 1
                failures += 1
                if failures >= GIVE_UP_AFTER:
                    out(f"gaveup {key} {entity_id} {error!r}".replace("\n", " "))
                    return None
                # A backoff before asking again, not a synchronisation.
                await trio.sleep(ERROR_BACKOFF_S)
        return None

    async def _ask_sender(self, number: int) -> None:
        sequence = 0
        while not self.draining:
            key = f"a{self.incarnation}-{number}-{sequence}"
            sequence += 1
            entity_id = self.rng.choice(ENTITIES)
            outcome = await self.ask(key, entity_id)
            if outcome is not None:
                self.acked["ask"] += 1
                out(f"ack {key} {entity_id} {outcome.pid} {outcome.run}")
                if self.rng.random() < AGAIN_PROBABILITY:
                    again = await self.ask(key, entity_id)
                    if again is not None:
                        out(f"again {key} {entity_id} {again.pid} {again.run}")
            await trio.sleep(ASK_PACE_S)

    async def _tell_sender(self) -> None:
        sequence = 0
        while not self.draining:
            key = f"t{self.incarnation}-{sequence}"
            sequence += 1
            entity_id = self.rng.choice(ENTITIES)
            for _ in range(GIVE_UP_AFTER):
                try:
                    await self.client.tell(post, entity_id, Post(key))
                except ClusterError as error:
                    self.errors[type(error).__name__] += 1
                    await trio.sleep(ERROR_BACKOFF_S)
                else:
                    self.acked["tell"] += 1
                    out(f"ack {key} {entity_id} 0 -")
                    break
            else:
                out(f"gaveup {key} {entity_id} tell")
            await trio.sleep(TELL_PACE_S)

    async def _volatile_sender(self) -> None:
        sequence = 0
        while not self.draining:
            entity_id = self.rng.choice(ENTITIES)
            text = f"v{self.incarnation}-{sequence}"
            sequence += 1
            try:
                echoed = await self.client.ask(echo, entity_id, Echo(text), timeout=ASK_TIMEOUT_S)
            except ClusterError as error:
                self.volatile[type(error).__name__] += 1
                await trio.sleep(ERROR_BACKOFF_S)
                continue
            if (echoed.text, echoed.entity_id) != (text, entity_id):
                out(f"bad volatile {entity_id} {text} answered {echoed!r}")
            self.volatile["ok"] += 1
            await trio.sleep(VOLATILE_PACE_S)

    async def probe(self) -> None:
        """Every traffic entity, volatile and persisted, each within ``PROBE_BOUND_S``."""
        self.probe_rounds += 1
        round_number = self.probe_rounds
        async with trio.open_nursery() as nursery:
            for entity_id in ENTITIES:
                nursery.start_soon(self._probe_volatile, entity_id)
                nursery.start_soon(self._probe_persisted, entity_id, round_number)
        out("probed")

    async def _probe_volatile(self, entity_id: str) -> None:
        started = trio.current_time()
        deadline = started + PROBE_BOUND_S
        last = "no attempt"
        while trio.current_time() < deadline:
            try:
                echoed = await self.client.ask(
                    echo,
                    entity_id,
                    Echo("probe"),
                    timeout=max(deadline - trio.current_time(), 0.001),
                )
            except ClusterError as error:
                last = repr(error).replace(" ", "_").replace("\n", "_")[:200]
                await trio.sleep(0.05)
                continue
            if echoed.entity_id != entity_id:
                last = f"wrong_entity_{echoed.entity_id}"
                break
            out(f"probe volatile {entity_id} ok {trio.current_time() - started:.3f}")
            return
        out(f"probe volatile {entity_id} fail {trio.current_time() - started:.3f} {last}")

    async def _probe_persisted(self, entity_id: str, round_number: int) -> None:
        started = trio.current_time()
        key = f"p{self.incarnation}-{round_number}-{entity_id}"
        outcome = await self.ask(key, entity_id, deadline=started + PROBE_BOUND_S)
        elapsed = trio.current_time() - started
        if outcome is None:
            out(f"probe persisted {entity_id} fail {elapsed:.3f} no_answer")
            return
        self.acked["probe"] += 1
        out(f"ack {key} {entity_id} {outcome.pid} {outcome.run}")
        out(f"probe persisted {entity_id} ok {elapsed:.3f}")


async def follow_commands(traffic: Traffic, traffic_done: trio.Event, stop: trio.Event) -> None:
    """Act on the harness's lines; the end of standard input means the harness is gone."""
    buffer = b""
    async with (
        trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin,
        trio.open_nursery() as nursery,
    ):
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                stop.set()
                return
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                command = line.decode().strip()
                if command == "probe":
                    nursery.start_soon(traffic.probe)
                elif command == "drain":
                    traffic.draining = True
                    nursery.start_soon(report_drained, traffic, traffic_done)
                else:
                    out(f"unknown command {command!r}")


async def report_drained(traffic: Traffic, traffic_done: trio.Event) -> None:
    await traffic_done.wait()
    out(f"drained {traffic.stats()}")


async def serve(dsn: str, prefix: str, incarnation: int, seed: int) -> None:
    stop = trio.Event()

    async def watch_signals() -> None:
        await wait_for_termination()
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        async with (
            open_postgres_storage(dsn, prefix=prefix, pool_size=4, timing=LEASE_TIMING) as storage,
            open_runner(storage=storage, config=CONFIG, transport=transport(prefix)) as client,
        ):
            out(f"ready {client.address} {client.machine_id}")
            traffic = Traffic(client, incarnation, random.Random(f"{seed}/{incarnation}"))
            traffic_done = trio.Event()

            async def send() -> None:
                await traffic.run()
                traffic_done.set()

            async with trio.open_nursery() as inner:
                inner.start_soon(send)
                inner.start_soon(follow_commands, traffic, traffic_done, stop)
                await stop.wait()
                inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit("usage: python -m tests.faults.client_app DSN PREFIX INCARNATION SEED")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    dsn, prefix, incarnation, seed = argv
    trio.run(serve, dsn, prefix, int(incarnation), int(seed))


if __name__ == "__main__":
    main(sys.argv[1:])
