"""Hostile peers against a runner's TCP port, in every transport mode.

Each test starts its own target process (``tests.hostile.target``: an owner
runner hosting ``Target`` and a client-only caller runner whose asks cross the
real socket to it), attacks it from this process with hand-made bytes
(``tests.hostile.peer``), and then asserts what the hardened library promises:
the process is still alive, its resident memory peaked no more than the stated
bound above where it was before the attack (``VmHWM``), the legitimate traffic
beside the attack got correct answers, the attacker's own link was closed where
the contract says it is, and SIGTERM still ends the target with exit code 0.

The regressions are named after their letter (``test_a_...`` to ``test_k_...``)
and each is red on the library before the hardening; ``test_l_...`` holds a
peer's stream to its window (streams came after the hardening). The fuzz (``test_fuzz_...``)
is deterministic: one fixed seed drives every random choice, so a red run
replays exactly. Nothing waits on time except where waiting *is* the attack
(trickling bytes, staying silent, reading slowly); every wait is bounded.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import msgspec
import pytest
import trio

from trio_cluster.core import reply as replies
from trio_cluster.core.envelope import Envelope
from trio_cluster.core.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    Goodbye,
    Hello,
    Interrupt,
    Message,
    Notify,
    Ping,
    Pong,
    ProtocolError,
    Reply,
    Request,
    StreamChunk,
    StreamCredit,
    Welcome,
)
from trio_cluster.core.protocol import PRE_AUTH_MAX_FRAME_SIZE, PROTOCOL_VERSION
from trio_cluster.core.snowflake import compose

from .app import CLUSTER, MODES, SHARDS, Mode, ProbeResult, Slow, pattern, shard_of
from .harness import MiB, TargetProcess, open_target
from .peer import (
    Outcome,
    Peer,
    connect,
    connect_tcp,
    envelope,
    header,
    many_frames,
    open_peer,
    our_hello,
    outcome,
    pings,
    raw_frame,
    request,
    start_of_huge_frame,
)

CLOSE_S: Final = 8.0
"""Bound on the target dropping a connection the contract says it drops.

Every such close is due within two ping intervals (2 s) or one handshake
timeout (1 s) under the tests' limits; the rest is slack for a loaded machine.
"""
REPLY_S: Final = 10.0
"""Bound on a reply the contract says comes back."""
SMALL_BUFFER: Final = 16 * 1024
"""Our receive buffer when we never read: the target, not our kernel, must hold the backlog."""
FAR_FUTURE_MS: Final = 4_102_444_800_000
"""2100-01-01T00:00:00Z in Unix milliseconds."""
SEED: Final = 20250101
"""The fuzz's one seed; with the mode and test name, every run replays the same cases."""
FUZZ_CONCURRENCY: Final = 24
"""Fuzz connections at once: under the tests' ``max_handshakes`` (32)."""


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Mode:
    value: Mode = request.param
    return value


# -- what every test checks --------------------------------------------------------------


class Budget:
    """The memory an attack may cost the target: peak RSS over the RSS before it.

    The peak (VmHWM, reset here through /proc/PID/clear_refs) rather than the RSS
    afterwards: memory a burst took and gave back still had to be there.
    """

    def __init__(self, target: TargetProcess, mib: int) -> None:
        self.target = target
        self.bound = mib * MiB
        self.baseline = target.rss()
        target.reset_peak()

    @property
    def growth(self) -> int:
        return self.target.peak() - self.baseline

    def exceeded(self) -> bool:
        return self.growth > self.bound

    def describe(self) -> str:
        return (
            f"target RSS peaked {self.growth / MiB:.0f} MiB above its"
            f" {self.baseline / MiB:.0f} MiB baseline (bound {self.bound / MiB:.0f} MiB)"
        )

    def check(self) -> None:
        assert not self.exceeded(), self.describe()


async def survived(target: TargetProcess, budget: Budget) -> None:
    """Alive, within its memory bound, still serving correctly, and it exits 0 on SIGTERM."""
    target.check_alive("after the attack")
    budget.check()
    await target.check_legit()
    target.check_alive("after the legitimate traffic")
    code = await target.stop()
    assert code == 0, f"target exited {code} on SIGTERM; stderr:\n{target.stderr_tail()}"


@asynccontextmanager
async def legit_traffic(target: TargetProcess) -> AsyncIterator[list[ProbeResult]]:
    """Legitimate probes in a loop for as long as the block runs: the traffic beside the attack.

    The target dying fails the test from here at once, with its traceback; wrong
    or failed answers are kept and fail it when the block ends (so that a crash
    that follows them is what the report shows).
    """
    results: list[ProbeResult] = []

    async def loop() -> None:
        while True:
            results.append(await target.probe(8, 16 * 1024))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop)
        yield results
        nursery.cancel_scope.cancel()
    errors = [error for result in results for error in result.errors]
    assert not errors, f"legitimate traffic failed during the attack: {errors[:10]}"


async def stay_silent(target: TargetProcess, intervals: float = 3) -> None:
    """Say and read nothing for a few ping intervals (the attack), watching the target live."""
    with trio.move_on_after(intervals * target.limits.ping_interval):
        await target.process.wait()
    target.check_alive("while the attacker stayed silent")


async def keep_writing(peer: Peer, target: TargetProcess, intervals: float = 3) -> None:
    """Send a harmless whole frame ten times a ping interval (the attack), never reading.

    Stops once a send fails (the target hung up on us) or after ``intervals``
    ping intervals; the frames keep the link alive by the liveness rule, so a
    close can only come from what the target has queued for us.
    """
    period = target.limits.ping_interval / 10
    frame = many_frames([Interrupt(2**62)])
    with trio.move_on_after(intervals * target.limits.ping_interval):
        while await peer.send(frame):
            target.check_alive("while the attacker kept writing")
            await trio.sleep(period)
    target.check_alive("while the attacker kept writing")


async def gather(jobs: Iterable[Callable[[], Awaitable[None]]], limit: int | None = None) -> None:
    """Run ``jobs`` concurrently, at most ``limit`` at a time."""
    jobs = list(jobs)
    limiter = trio.Semaphore(limit or max(1, len(jobs)))

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with limiter:
            await job()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job)


def max_frame_size(target: TargetProcess) -> int:
    """The frame limit the target runs with."""
    return target.limits.max_frame_size


def success(value: object) -> Outcome:
    return Outcome(None, value)


def reasons(outcomes: Sequence[Outcome]) -> list[str | None]:
    return [o.reason for o in outcomes]


async def until(
    peer: Peer,
    condition: Callable[[], bool],
    what: Callable[[], str],
    timeout: float = REPLY_S,  # noqa: ASYNC109
) -> None:
    """Wait for ``condition`` on what ``peer`` received; fail saying what was seen instead."""
    try:
        await peer.wait_for(condition, timeout)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout} s: {what()}") from None
    assert condition(), f"the target closed the link first: {what()}"


async def closed_within(peer: Peer, what: str, timeout: float = CLOSE_S) -> None:  # noqa: ASYNC109
    """The target must drop ``peer`` within ``timeout``; fail naming ``what`` otherwise."""
    try:
        await peer.wait_closed(timeout)
    except trio.TooSlowError:
        raise AssertionError(f"{what}: still connected after {timeout} s") from None


async def answers(peer: Peer, request_id: int) -> list[Outcome]:
    """The replies to ``request_id`` once there is at least one."""
    await until(
        peer,
        lambda: bool(peer.replies_to(request_id)),
        lambda: f"no reply to request {request_id} (closed={peer.closed})",
    )
    return peer.replies_to(request_id)


def never_reading(target: TargetProcess) -> AbstractAsyncContextManager[Peer]:
    """An honest member that, once in, reads nothing and answers no Ping."""
    return open_peer(
        target.ready.owner,
        target.credentials,
        background=False,
        answer_pings=False,
        receive_buffer=SMALL_BUFFER,
    )


# == the regressions ========================================================================

# -- A: Ping flood, never reading ------------------------------------------------------------

PING_FLOOD_BYTES: Final = 90 * 10**6
PING_FLOOD_S: Final = 180.0
"""Bound on pushing the flood: the target must either take it or close the link."""


async def test_a_ping_flood_never_reading(mode: Mode, tmp_path: Path) -> None:
    """~90 MB of Pings, nothing read: the Pongs pile up for us, and only our link may pay.

    Before the rewrite, every Pong is queued past the 64 MiB limit, and the runner's own next Ping
    raises RunnerUnavailable in the link's nursery: the process exits 1.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 64)
        chunk = pings(70_000)  # ~1 MB of the largest Pings (their Pongs are as large)
        async with legit_traffic(target), never_reading(target) as peer:
            sent = 0
            with trio.move_on_after(PING_FLOOD_S) as flooding:
                while sent < PING_FLOOD_BYTES and await peer.send(chunk):
                    sent += len(chunk)
                    target.check_alive(f"after {sent / 1e6:.0f} MB of Pings")
            assert not flooding.cancelled_caught, (
                f"the target stopped reading after {sent / 1e6:.0f} MB, without closing the link"
            )
            if not peer.closed:
                # The target took it all: now the silence its next Ping would meet.
                await stay_silent(target)
            # Reading now, the link must turn out to be over (max_unsent, or silence).
            await closed_within(peer, f"a peer that sent {sent / 1e6:.0f} MB of Pings unread")
        await survived(target, budget)


# -- B: reply forging and hijacking by a member ---------------------------------------------


def guessed_ids(sent_after_ms: int, machines: range, sequences: range) -> list[int]:
    """Every snowflake a caller could have minted from ``sent_after_ms`` until now.

    Ids are ``ms << 22 | machine << 12 | sequence``; machine ids are small and the
    sequence is almost always 0, so a window of milliseconds is a few thousand ids.
    """
    now_ms = time.time_ns() // 1_000_000
    return [
        compose(ms, machine, sequence)
        for ms in range(sent_after_ms - 2, now_ms + 2)
        for machine in machines
        for sequence in sequences
    ]


async def test_b1_forged_replies_are_ignored(mode: Mode, tmp_path: Path) -> None:
    """A member dials the caller and answers, by guessing ids, a request it never saw.

    Before the rewrite, the caller hands the forged value to its waiting ``ask``.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 32)
        tag, in_flight = await target.start_slow("victim-b1", "gate-b1", "legit-b1")
        guesses = guessed_ids(in_flight.sent_after_ms, range(4), range(4))
        assert in_flight.request_id is not None, "the target could not see the request's id"
        assert in_flight.request_id in guesses, "the guessing window misses the real id"
        forged = replies.success("forged")
        async with open_peer(target.ready.caller, target.credentials) as peer:
            await peer.send(many_frames(Reply(guess, forged) for guess in guesses))
            assert await peer.roundtrip(REPLY_S), "the caller dropped a link for stray Replies"
        await target.release("gate-b1")
        done = await target.slow_done(tag)
        assert (done.result, done.error) == ("legit-b1", None), (
            f"{len(guesses)} guessed Replies reached the caller's ask"
        )
        await survived(target, budget)


async def test_b2_reused_request_id_does_not_hijack(mode: Mode, tmp_path: Path) -> None:
    """A member dials the owner with a Request reusing the id of the caller's request.

    Before the rewrite, the owner's forwarding table is keyed by the id alone: the attacker's entry
    overwrites the caller's, and the caller's reply goes to the attacker.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 32)
        tag, in_flight = await target.start_slow("victim-b2", "gate-b2", "legit-b2", ask_timeout=5)
        stolen = in_flight.request_id
        assert stolen is not None, "the target could not see the request's id"
        async with open_peer(target.ready.owner, target.credentials) as peer:
            decoy = request(stolen, "slow", "decoy-b2", Slow("gate-b2-decoy", "decoy-b2"))
            await peer.send_frames(decoy)
            assert await peer.roundtrip(REPLY_S)
            await target.release("gate-b2")
            done = await target.slow_done(tag)
            assert (done.result, done.error) == ("legit-b2", None), (
                f"the caller lost its reply; the attacker got {peer.replies_to(stolen)}"
            )
            await target.release("gate-b2-decoy")
            assert await answers(peer, stolen) == [success("decoy-b2")]
        await survived(target, budget)


async def test_b3_refused_request_keeps_the_original_reply(mode: Mode, tmp_path: Path) -> None:
    """A refused Request reusing the caller's in-flight id must not touch the caller's request.

    Before the rewrite, the refusal removes the forwarding entry by id: the caller's real reply is
    dropped and its ask times out.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 32)
        tag, in_flight = await target.start_slow("victim-b3", "gate-b3", "legit-b3", ask_timeout=5)
        stolen = in_flight.request_id
        assert stolen is not None, "the target could not see the request's id"
        async with open_peer(target.ready.owner, target.credentials) as peer:
            # A shard index the owner does not have: refused, whichever check refuses it.
            await peer.send_frames(request(stolen, "echo", "x-b3", "x", shard_index=SHARDS + 3))
            [refusal] = await answers(peer, stolen)
            assert refusal.reason is not None, refusal
            await target.release("gate-b3")
            done = await target.slow_done(tag)
            assert (done.result, done.error) == ("legit-b3", None)
            assert peer.replies_to(stolen) == [refusal]
        await survived(target, budget)


async def test_b4_duplicate_id_on_one_link(mode: Mode, tmp_path: Path) -> None:
    """An id already in flight on the same link: AlreadyProcessingMessage; the original answers.

    Before the rewrite, the duplicate (for another entity) takes over the id: the attacker gets its
    echo under the id, and the original's reply is dropped.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 32)
        async with open_peer(target.ready.owner, target.credentials) as peer:
            first = request(77, "slow", "dup-b4", Slow("gate-b4", "first-b4"))
            again = request(77, "echo", "other-b4", "second-b4")
            await peer.send_frames(first, again)
            assert reasons(await answers(peer, 77)) == ["AlreadyProcessingMessage"]
            await target.release("gate-b4")
            await until(
                peer, lambda: len(peer.replies_to(77)) >= 2, lambda: str(peer.replies_to(77))
            )
            assert peer.replies_to(77)[1:] == [success("first-b4")]
        await survived(target, budget)


# -- C: memory before authentication -----------------------------------------------------------

HUGE_FRAME_CONNECTIONS: Final = 200


async def test_c_huge_frames_before_authentication(mode: Mode, tmp_path: Path) -> None:
    """200 unauthenticated connections each start a 16 MiB frame: no memory may follow them.

    Before the rewrite, each connection buffers its body (RSS would pass 1.4 GiB); the attack is cut
    short, and the test failed, as soon as the bound is crossed.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 96)
        peers: list[Peer] = []

        async def one() -> None:
            # The attack stops as soon as the bound is crossed (it once reached GiBs).
            peer = await start_of_huge_frame(owner, target.credentials, budget.exceeded)
            if peer is not None:
                peers.append(peer)

        owner = target.ready.owner
        async with legit_traffic(target):
            with trio.fail_after(60):
                await gather([one] * HUGE_FRAME_CONNECTIONS)
        budget.check()
        try:
            await gather(
                partial(closed_within, peer, "a connection announcing a 16 MiB frame")
                for peer in peers
            )
            assert not any(p.peer_hello for p in peers), "an unauthenticated peer got a Hello"
        finally:
            for peer in peers:
                await peer.aclose()
        await survived(target, budget)


# -- D: trickling an unfinished frame -------------------------------------------------------


async def trickle(peer: Peer, data: bytes, interval: float = 0.1) -> None:
    """Send ``data`` a byte at a time (the attack), until it is all out or the target hangs up."""
    for byte in data:
        if not await peer.send(bytes([byte])):
            return
        await trio.sleep(interval)


async def test_d_trickle_after_the_handshake(mode: Mode, tmp_path: Path) -> None:
    """A byte every tenth of a second of a frame never finished: no whole frame, no liveness.

    Before the rewrite, any byte counts as liveness, so the link lives on forever.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 16)
        async with open_peer(target.ready.owner, target.credentials, answer_pings=False) as peer:
            try:
                with trio.fail_after(CLOSE_S):
                    await trickle(peer, header(1000) + b"\x90" * 1000)
                    await peer.wait_closed(CLOSE_S)
            except trio.TooSlowError:
                raise AssertionError(f"a trickling peer kept its link for {CLOSE_S} s") from None
        await survived(target, budget)


# -- E: far-future requests -----------------------------------------------------------------

FAR_FUTURE_REQUESTS: Final = 50_000


async def test_e_far_future_requests_are_bounded(mode: Mode, tmp_path: Path) -> None:
    """50,000 volatile requests due in 2100: past ``max_scheduled_per_shard``, MailboxFull.

    Before the rewrite, every one is kept in memory until 2100, and none is answered.
    """
    async with open_target(mode, tmp_path) as target:
        limit = target.limits.max_scheduled_per_shard
        assert limit is not None
        expected = FAR_FUTURE_REQUESTS - limit
        budget = Budget(target, 32)
        async with legit_traffic(target), open_peer(target.ready.owner, target.credentials) as peer:
            assert await peer.send(
                many_frames(
                    request(n, "echo", "future-e", f"e{n}", deliver_at_ms=FAR_FUTURE_MS)
                    for n in range(1, FAR_FUTURE_REQUESTS + 1)
                )
            )
            await until(
                peer,
                lambda: peer.reply_count >= expected,
                lambda: f"{peer.reply_count} of {expected} refusals; {budget.describe()}",
            )
            assert await peer.roundtrip(REPLY_S)
            refused = [m for m in peer.messages if isinstance(m, Reply)]
            assert len(refused) == expected, f"{len(refused)} replies, {expected} expected"
            assert {outcome(m.reply).reason for m in refused} == {"MailboxFull"}
        await survived(target, budget)


# -- F and K: nothing for a peer that has not proven itself ------------------------------------


async def test_f_the_runner_does_not_speak_first(mode: Mode, tmp_path: Path) -> None:
    """A connection that says nothing (after TLS, in the tls mode) hears nothing, and is closed.

    Before the rewrite, every connection gets the runner's Hello (cluster, address, nonce) at once.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 16)

        async def silent(address: str) -> None:
            peer = Peer(await connect(address, target.credentials))
            try:
                await closed_within(peer, "a silent connection")
                assert peer.received_bytes == 0, f"the runner spoke first: {peer.messages[:2]!r}"
            finally:
                await peer.aclose()

        await gather(
            partial(silent, address) for address in (target.ready.owner, target.ready.caller)
        )
        await survived(target, budget)


async def test_f_invalid_hellos_get_no_hello(mode: Mode, tmp_path: Path) -> None:
    """A wrong cluster, a wrong version, or not a Hello at all: no Hello, no Welcome, no names.

    A valid Hello, by contrast, is answered with the runner's Hello and Welcome.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 16)
        owner = target.ready.owner
        leaks = [CLUSTER, owner, owner.rpartition(":")[2]]
        openings = {
            "wrong cluster": many_frames([our_hello(cluster="elsewhere")]),
            "wrong version": many_frames([our_hello(version=PROTOCOL_VERSION + 1)]),
            "a Ping": many_frames([Ping(1)]),
            "a Welcome": many_frames([Welcome(b"")]),
            "HTTP": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        }

        async def opening(name: str, data: bytes) -> None:
            peer = Peer(await connect(owner, target.credentials))
            try:
                await peer.send(data)
                await closed_within(peer, f"a connection opening with {name}")
                assert not peer.count(Hello) and not peer.count(Welcome), (name, peer.messages)
                seen = repr(peer.messages)
                assert not [leak for leak in leaks if leak in seen], (name, peer.messages)
            finally:
                await peer.aclose()

        await gather(partial(opening, name, data) for name, data in openings.items())
        async with open_peer(owner, target.credentials) as member:
            assert member.peer_hello is not None and member.count(Welcome) == 1
            assert await member.roundtrip(REPLY_S)
        await survived(target, budget)


async def test_k_idle_tcp_connections_are_closed_silently(mode: Mode, tmp_path: Path) -> None:
    """Bare TCP connections that never send (nor start TLS): closed within the handshake timeout.

    Before the rewrite, a TLS listener holds them forever; the other listeners send a Hello first.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 16)

        async def idle(address: str) -> None:
            peer = Peer(await connect_tcp(address))
            try:
                await closed_within(peer, "an idle TCP connection")
                assert peer.received_bytes == 0, f"the runner spoke first: {peer.received_bytes} B"
            finally:
                await peer.aclose()

        addresses = [target.ready.owner, target.ready.caller] * 4
        await gather(partial(idle, address) for address in addresses)
        await survived(target, budget)


# -- G: a shard index that does not match the entity id ------------------------------------------


async def test_g_shard_index_must_match_the_entity(mode: Mode, tmp_path: Path) -> None:
    """The same entity id under another shard index: MalformedMessage, no second activation.

    Before the rewrite, a second copy of the entity is activated on the same runner; once idle
    passivation has taken one copy, the next request for the entity, or SIGTERM, crashes the process
    with KeyError (the resident map lost track of the other).
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 16)
        async with open_peer(target.ready.owner, target.credentials) as peer:
            right = shard_of("twin-g")
            await peer.send_frames(
                request(1, "echo", "twin-g", "first"),
                request(2, "echo", "twin-g", "second", shard_index=(right + 1) % SHARDS),
            )
            assert await answers(peer, 1) == [success("first")]
            assert reasons(await answers(peer, 2)) == ["MalformedMessage"]
        await survived(target, budget)


# -- H: a reply that does not fit a frame ---------------------------------------------------

TOO_LARGE: Final = DEFAULT_MAX_FRAME_SIZE + 1024
"""Over every frame limit the target may run with: the default one, the tests' smaller one."""


async def test_h_reply_over_the_frame_limit(mode: Mode, tmp_path: Path) -> None:
    """A reply bigger than a frame, to a remote caller: SerializationError for that caller only.

    Before the rewrite, FrameTooLarge escapes the owner's entity task and kills the process.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 192)
        big = await target.big(TOO_LARGE)
        assert big.error == "SerializationError", big
        async with open_peer(target.ready.owner, target.credentials) as peer:
            await peer.send_frames(request(5, "sized", "big-h", TOO_LARGE))
            assert reasons(await answers(peer, 5)) == ["SerializationError"]
            # Just under the message size limit (the frame limit less 64 KiB of room
            # for what travels beside a payload) still goes through, to the same peer.
            fits = max_frame_size(target) - 64 * 1024 - 1024
            await peer.send_frames(request(6, "sized", "big-h", fits))
            [reply] = await answers(peer, 6)
            assert reply.reason is None and reply.value == pattern(fits)
        await survived(target, budget)


# -- I: a peer that never reads its replies --------------------------------------------------------

UNREAD_REPLIES: Final = 96


async def test_i_large_replies_never_read(mode: Mode, tmp_path: Path) -> None:
    """96 requests for 1 MiB replies, none of them read: over ``max_unsent`` only our link closes.

    Before the rewrite, the runner dies once 64 MiB are queued for the attacker.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 96)
        async with legit_traffic(target), never_reading(target) as peer:
            await peer.send(
                many_frames(
                    request(n, "sized", f"unread-{n % 8}", MiB)
                    for n in range(1, UNREAD_REPLIES + 1)
                )
            )
            # Still writing (so only what is queued for us can end the link), never reading.
            await keep_writing(peer, target)
            await closed_within(peer, "a peer with 96 MiB of replies unread")
        await survived(target, budget)


# -- L: a stream's window -----------------------------------------------------------------


def chunks_of(peer: Peer, request_id: int) -> list[int]:
    return [
        msgspec.msgpack.decode(m.chunk)
        for m in peer.messages
        if isinstance(m, StreamChunk) and m.request_id == request_id
    ]


async def test_l_a_peers_stream_keeps_to_its_window(mode: Mode, tmp_path: Path) -> None:
    """Chunks and credits for no stream are ignored, a stream request for an RPC that is
    none is MalformedMessage, a stream sends at most its window before credit, and credit
    the peer never earned is clamped to the window; the link stays open throughout."""
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 16)
        async with open_peer(target.ready.owner, target.credentials) as peer:
            await peer.send_frames(
                StreamChunk(999, b"\x01"),
                StreamCredit(998, 10**9),
                Request(envelope(1, "echo", "stream-l", "x"), stream_window=4),
                Request(envelope(2, "ticks", "stream-l", -1), stream_window=3),
            )
            assert reasons(await answers(peer, 1)) == ["MalformedMessage"]
            seen = lambda: f"chunks {chunks_of(peer, 2)}"  # noqa: E731
            await until(peer, lambda: len(chunks_of(peer, 2)) == 3, seen)
            assert await peer.roundtrip(REPLY_S)
            assert chunks_of(peer, 2) == [0, 1, 2]
            await peer.send_frames(StreamCredit(2, 2**62))
            await until(peer, lambda: len(chunks_of(peer, 2)) == 6, seen)
            assert await peer.roundtrip(REPLY_S)
            assert chunks_of(peer, 2) == list(range(6))
            assert not peer.closed
        await survived(target, budget)


# -- J: persisted=True in a Request frame ---------------------------------------------------


async def test_j_persisted_request_frames_are_refused(mode: Mode, tmp_path: Path) -> None:
    """Persisted requests travel through storage: in a Request frame, MalformedMessage.

    Before the rewrite, one that finds the mailbox full is dropped without any reply.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 16)
        capacity = target.limits.mailbox_capacity
        # More than a full mailbox and the one running: whichever are refused, it is full.
        held = range(1, capacity + 3)
        async with open_peer(target.ready.owner, target.credentials) as peer:
            await peer.send(
                many_frames(request(n, "slow", "full-j", Slow("gate-j", f"held-{n}")) for n in held)
            )
            assert await peer.roundtrip(REPLY_S)
            await peer.send_frames(
                request(500, "echo", "full-j", "persisted", persisted=True),
                request(501, "echo", "idle-j", "persisted", persisted=True),
            )
            assert reasons(await answers(peer, 500)) == ["MalformedMessage"]
            assert reasons(await answers(peer, 501)) == ["MalformedMessage"]
            await peer.send_frames(request(502, "release", "opener-j", "gate-j"))
            await until(
                peer,
                lambda: all(peer.replies_to(n) for n in held),
                lambda: (
                    f"{sum(bool(peer.replies_to(n)) for n in held)} of {len(held)} held replies"
                ),
            )
            outcomes = {n: peer.replies_to(n) for n in held}
            taken = [n for n, got in outcomes.items() if got == [success(f"held-{n}")]]
            refused = [n for n, got in outcomes.items() if reasons(got) == ["MailboxFull"]]
            assert len(taken) + len(refused) == len(held), outcomes
            assert len(taken) >= capacity, outcomes
        await survived(target, budget)


# == the fuzz =================================================================================


def fuzz_random(mode: Mode, name: str) -> random.Random:
    """The one seed, per mode and test: each run of the suite sees the same cases."""
    return random.Random(f"{SEED}-{mode}-{name}")


WRONG_VALUES: Final[tuple[object, ...]] = (
    None,
    True,
    -1,
    2**64 - 1,
    -(2**63),
    0.5,
    "text",
    b"bytes",
    [],
    [[[]]],
    {},
    {"k": b"v"},
    msgspec.Raw(b"\xa3\xff\xfe\xfd"),  # a str that is not UTF-8
    msgspec.Raw(b"\xc1"),  # the one byte msgpack never uses
    msgspec.Raw(b"\xd4\x05\x00"),  # an extension type
    msgspec.Raw(b"\x91" * 3000 + b"\x00"),  # nesting deeper than any decoder recurses
)
"""Values of every msgpack kind, and a few no decoder should take."""


def valid_bodies() -> dict[str, list[object]]:
    """One well-formed body of every frame type, as a plain list to corrupt field by field."""
    envelope_fields: list[object] = [
        123, "Target", "fz", "default", shard_of("fz"), "echo", msgspec.msgpack.encode("x"),
        False, None, None, {}, [],
    ]  # fmt: skip
    return {
        "Hello": [1, PROTOCOL_VERSION, CLUSTER, "fuzzer", b"n" * 32],
        "Welcome": [2, b""],
        "Reject": [3, "no"],
        "Goodbye": [4, "bye"],
        "Request": [5, envelope_fields],
        "Reply": [6, 123, replies.success("x")],
        "Interrupt": [7, 123],
        "Notify": [8, "default", 0, [1, 2]],
        "Ping": [9, 1],
        "Pong": [10, 1],
    }


def wrong_type_cases(rng: random.Random) -> list[tuple[str, bytes]]:
    """Every field of every frame type (the envelope's included) given values of other kinds.

    Plus the shape itself: unknown tags, missing fields, a map for an array, and
    bodies that are not arrays at all. ``rng`` picks a few wrong values per field.
    """
    cases: list[tuple[str, bytes]] = []
    for name, body in valid_bodies().items():
        for position in range(1, len(body)):
            for value in rng.sample(WRONG_VALUES, 4):
                corrupt = list(body)
                corrupt[position] = value
                cases.append((f"{name} field {position} = {value!r:.40}", raw_frame(corrupt)))
        cases.append((f"{name} without its fields", raw_frame(body[:1])))
        cases.append((f"{name} as a map", raw_frame(dict(enumerate(body)))))
        if name == "Request":
            fields = body[1]
            assert isinstance(fields, list)
            for position in range(len(fields)):
                for value in rng.sample(WRONG_VALUES, 3):
                    corrupt = list(fields)
                    corrupt[position] = value
                    cases.append(
                        (f"envelope field {position} = {value!r:.40}", raw_frame([5, corrupt]))
                    )
            cases.append(("envelope without its fields", raw_frame([5, fields[:3]])))
    cases += [
        (f"tag {tag!r}", raw_frame([tag, 1]))
        for tag in (0, 11, 127, -1, 2**64 - 1, "Ping", None, 9.0)
    ]
    cases += [
        ("an empty array", raw_frame([])),
        ("an int", raw_frame(5)),
        ("a string", raw_frame("Ping")),
        ("an empty body", header(0)),
        ("nested too deep", raw_frame([9, msgspec.Raw(b"\x91" * 3000 + b"\x00")])),
    ]
    return cases


def is_valid_hello(data: bytes) -> bool:
    """Whether ``data`` is a Hello the target must answer (a fuzz case can be one by chance)."""
    try:
        messages = FrameDecoder().feed(data)
    except ProtocolError:
        return False
    return bool(
        messages
        and isinstance(hello := messages[0], Hello)
        and hello.protocol_version == PROTOCOL_VERSION
        and hello.cluster == CLUSTER
        and len(hello.nonce) >= 16
    )


Stage = Literal["before", "after"]


async def send_case(target: TargetProcess, stage: Stage, name: str, data: bytes) -> None:
    """One fuzz case on its own connection, before or after an honest handshake.

    Before: the connection must be closed, without a Hello unless ``data`` was a
    valid Hello. After: the link either survives (a Ping still gets its Pong,
    so the frame was taken or ignored) or is closed; either way the target lives.
    """
    address = target.ready.owner
    if stage == "before":
        peer = Peer(await connect(address, target.credentials), answer_pings=False)
        try:
            await peer.send(data)
            await closed_within(peer, f"{name}, before the handshake")
            if not is_valid_hello(data):
                assert peer.peer_hello is None, f"{name}: answered with a Hello"
        finally:
            await peer.aclose()
    else:
        async with open_peer(address, target.credentials, answer_pings=False) as peer:
            await peer.send(data)
            try:
                await peer.roundtrip(CLOSE_S)
            except trio.TooSlowError:
                # An unfinished frame swallowed our Ping: the link must go for silence.
                await closed_within(peer, f"{name}, an unfinished frame after the handshake")
    target.check_alive(f"after the fuzz case {name!r} ({stage} the handshake)")


async def run_cases(
    target: TargetProcess, cases: Sequence[tuple[str, bytes]], stages: Sequence[Stage]
) -> None:
    await gather(
        (partial(send_case, target, stage, name, data) for stage in stages for name, data in cases),
        limit=FUZZ_CONCURRENCY,
    )


async def test_fuzz_wrong_types_in_every_field(mode: Mode, tmp_path: Path) -> None:
    """Every frame type with a wrong kind of value in each field, before and after the handshake."""
    cases = wrong_type_cases(fuzz_random(mode, "wrong types"))
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 48)
        async with legit_traffic(target):
            await run_cases(target, cases, ("before", "after"))
        await survived(target, budget)


def random_bytes_cases(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Random bytes: raw, framed with a plausible length, or frames cut short."""
    cases = []
    for number in range(count):
        kind = number % 4
        size = rng.randrange(1, 3000)
        blob = rng.randbytes(size)
        if kind == 1:  # a whole frame of random body
            blob = header(size) + blob
        elif kind == 2:  # a frame announcing more than is sent
            blob = header(size + rng.randrange(1, 500)) + blob
        elif kind == 3:  # random msgpack-looking bytes: array and map headers, small ints
            body = bytes(
                rng.choice(b"\x90\x91\x92\x93\x9c\x80\x81\xc0\xc2\xc3\x05\x09\xa1")
                for _ in range(size)
            )
            blob = header(len(body)) + body
        cases.append((f"random bytes #{number} (kind {kind}, {size} B)", blob))
    return cases


async def test_fuzz_random_bytes(mode: Mode, tmp_path: Path) -> None:
    """Seeded random bytes, before and after the handshake, on the owner's port."""
    cases = random_bytes_cases(fuzz_random(mode, "random bytes"), 40)
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 48)
        async with legit_traffic(target):
            await run_cases(target, cases, ("before", "after"))
        await survived(target, budget)


Expect = Literal["malformed", "success", "answered"]


@attrs.frozen
class HostileCase:
    """A Request of the right shape with a value no legitimate caller sends, and the verdict.

    ``malformed``: the contract's validation refuses it with MalformedMessage;
    ``success``: it is legitimate after all and must answer ``value``;
    ``answered``: any one reply (an error, most likely) will do.
    """

    name: str
    expect: Expect
    envelope: Envelope
    value: object = None

    def misjudged(self, got: list[Outcome]) -> str | None:
        """What is wrong with the replies ``got`` to this case, if anything."""
        if len(got) != 1:
            return f"{self.name}: {len(got)} replies"
        if self.expect == "malformed" and got[0].reason != "MalformedMessage":
            return f"{self.name}: {got[0]}, not MalformedMessage"
        if self.expect == "success" and got[0] != success(self.value):
            return f"{self.name}: {got[0]}, not {self.value!r}"
        return None


def hostile_requests() -> list[HostileCase]:
    long_id = "é" * 512  # 1024 UTF-8 bytes: the longest allowed entity id
    bad_payload = msgspec.structs.replace(envelope(0, "echo", "r", ""), payload=b"\xc1")

    def echo(entity_id: str, **fields: Any) -> Envelope:
        return envelope(0, "echo", entity_id, "v", **fields)

    def headers(count_: int, size: int = 1) -> dict[str, str]:
        return {f"h{i}": "v" * size for i in range(count_)}

    malformed: Expect = "malformed"
    ok: Expect = "success"
    answered: Expect = "answered"
    return [
        HostileCase("entity id of 1025 bytes", malformed, echo(long_id + "x")),
        HostileCase("entity id of 1024 bytes", ok, echo(long_id), "v"),
        HostileCase("65 headers", malformed, echo("h", headers=headers(65))),
        HostileCase("64 headers", ok, echo("h", headers=headers(64)), "v"),
        HostileCase("headers over 8 KiB", malformed, echo("h", headers=headers(1, 9000))),
        HostileCase("wrong shard", malformed, echo("s", shard_index=(shard_of("s") + 1) % SHARDS)),
        HostileCase("negative shard index", malformed, echo("s", shard_index=-1)),
        HostileCase("huge shard index", malformed, echo("s", shard_index=2**63 - 1)),
        HostileCase("persisted", malformed, echo("p", persisted=True)),
        HostileCase("unknown rpc", malformed, envelope(0, "nope", "r", "v")),
        HostileCase("payload of the wrong type", malformed, envelope(0, "echo", "r", 5)),
        HostileCase("undecodable payload", malformed, bad_payload),
        HostileCase("unknown entity type", answered, echo("t", entity_type="Nope")),
        HostileCase("unknown shard group", answered, echo("t", shard_group="nope")),
        HostileCase(
            "runner message nobody handles", malformed, echo("t", shard_group="__runner__")
        ),
        HostileCase("empty entity id", ok, echo(""), "v"),
        HostileCase("NUL in entity id", malformed, echo("a\0b")),
        HostileCase("due long ago", ok, echo("d", deliver_at_ms=1), "v"),
        HostileCase("due before 1970", malformed, echo("d", deliver_at_ms=-(2**63))),
        HostileCase("due after 9999", malformed, echo("d", deliver_at_ms=2**63 - 1)),
        HostileCase("call chain of 2000", answered, echo("c", call_chain=("Target/x",) * 2000)),
        HostileCase("itself in its call chain", answered, echo("c2", call_chain=("Target/c2",))),
        HostileCase("negative size", ok, envelope(0, "sized", "z", -5), b""),
    ]


ODD_IDS: Final = (0, 2**63 - 1, 2**64 - 1, -1, -(2**63))
"""Request ids at and past the ends of what a snowflake can be: answered under the same id."""


def stray_frames() -> list[Message]:
    """Valid frames that concern nothing in flight: each must be ignored, the link kept."""
    return [
        *(Interrupt(i) for i in [*ODD_IDS, 1000, 123456789]),
        *(Notify("default", index, [1, 2, 2**63 - 1]) for index in range(SHARDS)),
        Notify("default", 2**40, [1]),
        Notify("nope", 0, []),
        *(Reply(i, replies.success("stray")) for i in [*ODD_IDS, 1000, 77]),
        Reply(5, b"\xc1 not a reply"),
        *(Pong(i) for i in (0, 2**64 - 1)),
        Ping(0),
        Ping(2**64 - 1),
    ]


async def test_fuzz_hostile_values(mode: Mode, tmp_path: Path) -> None:
    """Well-formed frames with hostile values: the validation contract, and nothing else breaks.

    Every Request gets exactly one reply on a link that stays up; odd request ids
    are answered under the same id; stray Interrupts, Notifies, Replies and Pongs
    are ignored without closing the link.
    """
    cases = {1000 + n: case for n, case in enumerate(hostile_requests())}
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 48)
        async with open_peer(target.ready.owner, target.credentials) as peer:
            await peer.send(
                many_frames(
                    Request(msgspec.structs.replace(case.envelope, request_id=request_id))
                    for request_id, case in cases.items()
                )
            )
            await peer.send(many_frames(request(i, "echo", "odd", f"id {i}") for i in ODD_IDS))
            everything = [*cases, *ODD_IDS]

            def unanswered() -> str:
                missing = [i for i in everything if not peer.replies_to(i)]
                return f"no reply to {[cases[i].name if i in cases else i for i in missing]}"

            await until(peer, lambda: all(peer.replies_to(i) for i in everything), unanswered)
            assert await peer.roundtrip(REPLY_S), "a hostile Request closed the link"
            wrong = [case.misjudged(peer.replies_to(i)) for i, case in cases.items()]
            wrong += [
                f"request id {i}: {peer.replies_to(i)}"
                for i in ODD_IDS
                if peer.replies_to(i) != [success(f"id {i}")]
            ]
            assert not any(wrong), "\n".join(filter(None, wrong))

            await peer.send(many_frames(stray_frames()))
            assert await peer.roundtrip(REPLY_S), "stray frames closed the link"
            assert {m.nonce for m in peer.messages if isinstance(m, Pong)} >= {0, 2**64 - 1}
            await peer.send_frames(Goodbye("done"))
            await closed_within(peer, "a peer that said Goodbye")
        await survived(target, budget)


async def test_fuzz_truncated_and_oversized_frames(mode: Mode, tmp_path: Path) -> None:
    """Frames cut short, over the limits, split into single bytes, or trickled before the Hello."""
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 48)
        owner = target.ready.owner

        async def before(name: str, data: bytes) -> None:
            peer = Peer(await connect(owner, target.credentials), answer_pings=False)
            try:
                await peer.send(data)
                await closed_within(peer, f"{name}, before the handshake")
                assert peer.peer_hello is None, f"{name}: answered with a Hello"
            finally:
                await peer.aclose()

        async def trickled_hello() -> None:
            hello = raw_frame([1, PROTOCOL_VERSION, CLUSTER, "trickler", b"n" * 32])
            peer = Peer(await connect(owner, target.credentials), answer_pings=False)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(peer.read_forever)
                    try:
                        with trio.fail_after(CLOSE_S):
                            await trickle(peer, hello * 10)
                            await peer.wait_closed(CLOSE_S)
                    except trio.TooSlowError:
                        message = f"a Hello trickled for {CLOSE_S} s was not cut off"
                        raise AssertionError(message) from None
            finally:
                await peer.aclose()

        async def after_oversized() -> None:
            async with open_peer(owner, target.credentials) as peer:
                await peer.send(header(max_frame_size(target) + 1) + b"\0" * 1024)
                await closed_within(peer, "a frame over max_frame_size")

        async def after_truncated(cut: int) -> None:
            frame = many_frames([request(9, "echo", "cut", "x" * 100)])
            async with open_peer(owner, target.credentials) as peer:
                await peer.send(frame[:cut])
            # Our side closed mid-frame; the target must only drop the link.

        async def after_byte_by_byte() -> None:
            frame = many_frames([request(10, "echo", "bytewise", "one byte at a time")])
            async with open_peer(owner, target.credentials) as peer:
                for byte in frame:
                    assert await peer.send(bytes([byte]))
                assert await answers(peer, 10) == [success("one byte at a time")]

        jobs: list[Callable[[], Awaitable[None]]] = [
            lambda: before("a header over the pre-auth limit", header(PRE_AUTH_MAX_FRAME_SIZE + 1)),
            lambda: before("a 16 MiB header", header(DEFAULT_MAX_FRAME_SIZE)),
            lambda: before("a 4 GiB header", header(2**32 - 1)),
            lambda: before(
                "a pre-auth-sized frame of junk",
                header(PRE_AUTH_MAX_FRAME_SIZE) + b"\xff" * PRE_AUTH_MAX_FRAME_SIZE,
            ),
            lambda: before("half a header", b"\0\0"),
            lambda: before("a Hello cut short", many_frames([our_hello()])[:20]),
            trickled_hello,
            after_oversized,
            after_byte_by_byte,
            *(partial(after_truncated, cut) for cut in (1, 3, 4, 5, 30)),
        ]
        await gather(jobs, limit=FUZZ_CONCURRENCY)
        await survived(target, budget)


FLOOD_REQUESTS: Final = 3000
FLOOD_FRAMES: Final = 20_000


async def test_fuzz_floods(mode: Mode, tmp_path: Path) -> None:
    """Floods of every frame an authenticated peer may send, read as they come.

    Each of 3,000 echo Requests (over 30 entities, far past their mailboxes) gets
    exactly one reply: its echo or MailboxFull; tens of thousands of Interrupts,
    Notifies, stray Replies and Pongs leave the link up.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 64)
        async with legit_traffic(target), open_peer(target.ready.owner, target.credentials) as peer:
            ids = range(1, FLOOD_REQUESTS + 1)
            await peer.send(
                many_frames(request(n, "echo", f"flood-{n % 30}", f"f{n}") for n in ids)
            )
            await until(
                peer,
                lambda: len(peer.reply_ids()) >= FLOOD_REQUESTS,
                lambda: f"{len(peer.reply_ids())} of {FLOOD_REQUESTS} requests answered",
            )
            bad = [
                (n, got)
                for n in ids
                if (got := peer.replies_to(n)) != [success(f"f{n}")]
                and reasons(got) != ["MailboxFull"]
            ]
            assert not bad, bad[:10]
            rng = fuzz_random(mode, "floods")
            for frames in (
                (Interrupt(rng.getrandbits(63)) for _ in range(FLOOD_FRAMES)),
                (
                    Notify("default", rng.randrange(SHARDS), [rng.getrandbits(63)])
                    for _ in range(2000)
                ),
                (Reply(rng.getrandbits(63), replies.success(None)) for _ in range(FLOOD_FRAMES)),
                (Pong(rng.getrandbits(64)) for _ in range(FLOOD_FRAMES)),
            ):
                assert await peer.send(many_frames(frames))
                assert await peer.roundtrip(REPLY_S), "a flood of valid frames closed the link"
        await survived(target, budget)


SLOW_REPLIES: Final = 8
SLOW_REPLY_SIZE: Final = 256 * 1024
"""8 of these are 2 MiB: under the tests' ``max_unsent`` (4 MiB), so the link must survive."""


async def test_fuzz_slow_reader(mode: Mode, tmp_path: Path) -> None:
    """A member reading its replies slowly, through a tiny buffer: it gets every one, in time.

    What the target cannot send waits for it (under ``max_unsent``), and no one
    else waits: the legitimate traffic beside it is served meanwhile.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 64)
        async with (
            legit_traffic(target),
            open_peer(
                target.ready.owner,
                target.credentials,
                background=False,
                receive_buffer=SMALL_BUFFER,
            ) as peer,
        ):
            await peer.send(
                many_frames(
                    request(n, "sized", f"slow-{n % 4}", SLOW_REPLY_SIZE)
                    for n in range(1, SLOW_REPLIES + 1)
                )
            )
            with trio.fail_after(60):
                while not peer.closed and peer.reply_count < SLOW_REPLIES:
                    await peer.read_some()
                    await trio.sleep(0.005)  # the attack: reading slowly
            assert peer.reply_count == SLOW_REPLIES, f"closed after {peer.reply_count} replies"
            for n in range(1, SLOW_REPLIES + 1):
                assert peer.replies_to(n) == [success(pattern(SLOW_REPLY_SIZE))]
        await survived(target, budget)


IDLE_CONNECTIONS: Final = 300
SILENT_MEMBERS: Final = 40


async def test_fuzz_connection_flood(mode: Mode, tmp_path: Path) -> None:
    """Hundreds of idle connections (past max_inbound and max_handshakes) and silent members.

    Every one is closed in time (at once beyond the limits, at the handshake
    timeout or for silence otherwise), none hears a word before its Hello, and
    the caller's established link keeps serving the legitimate traffic.
    """
    async with open_target(mode, tmp_path) as target:
        budget = Budget(target, 96)
        await target.check_legit()  # the caller's link is up before the flood

        async def idle() -> None:
            try:
                peer = Peer(await connect_tcp(target.ready.owner))
            except OSError:
                return
            try:
                await closed_within(peer, "an idle connection in a flood")
                assert peer.received_bytes == 0, "the runner spoke first"
            finally:
                await peer.aclose()

        async def silent_member(*, task_status: trio.TaskStatus[None]) -> None:
            async with open_peer(
                target.ready.owner, target.credentials, answer_pings=False
            ) as peer:
                task_status.started()
                await closed_within(peer, "a member that never answers a Ping")

        async def churn() -> None:
            for _ in range(200):
                try:
                    stream = await connect_tcp(target.ready.owner)
                except OSError:
                    continue
                await trio.aclose_forcefully(stream)

        async with legit_traffic(target):
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    # Members first, one handshake at a time: handshakes are what the flood starves.
                    for _ in range(SILENT_MEMBERS):
                        await nursery.start(silent_member)
                    await gather([*[idle] * IDLE_CONNECTIONS, churn])
        await survived(target, budget)
