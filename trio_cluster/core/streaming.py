"""Streaming replies: the credit window of one stream, and the two ends a runtime implements.

A stream is a request whose handler yields chunks, each an encoded value of
the RPC's chunk type, and whose ordinary reply ends it (a success for a
handler that returned, or the error it ended in, after every chunk it sent).
Between the two ends runs a credit window: the caller grants ``window``
credits with the request, each chunk spends one, and the caller grants
them back as its code consumes chunks. So a handler is never more than
``window`` chunks ahead of its caller, and the caller never buffers more:
a chunk without credit is the peer breaking the protocol, not something
to queue.

Credits go back in batches of half the window (one frame per batch, not
per chunk). That can never stall: when the producer is out of credit,
every chunk of the window has reached the caller, so either some wait
unconsumed, or all were consumed and a batch was granted.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

MAX_WINDOW = 4096
"""Largest window a caller may ask for: what it buffers is the window times the
message size limit."""


class CreditWindow:
    """The caller's account of one stream: credit the producer holds, and chunks
    consumed but not yet granted back."""

    __slots__ = ("_batch", "_credit", "_returned", "window")

    def __init__(self, window: int) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"a stream window is 1..{MAX_WINDOW} chunks (got {window})")
        self.window = window
        self._credit = window
        self._returned = 0
        self._batch = (window + 1) // 2

    @property
    def credit(self) -> int:
        """Chunks the producer may send now without waiting."""
        return self._credit

    def arrived(self) -> bool:
        """A chunk came: spend its credit. False (nothing spent) when it had none."""
        if self._credit == 0:
            return False
        self._credit -= 1
        return True

    def consumed(self) -> int:
        """The caller took a chunk: how many credits to grant the producer now (0: not yet)."""
        self._returned += 1
        if self._returned < self._batch:
            return 0
        granted, self._returned = self._returned, 0
        self._credit += granted
        return granted


def granted(credit: int, credits: int, window: int) -> int:
    """The producer's credit after the caller granted ``credits`` more: never above the
    window (a peer granting what it never consumed gains nothing by it)."""
    return min(window, credit + max(0, credits))


class ChunkSink(abc.ABC):
    """Where a stream handler's chunks go: its caller here, or the link to its caller.

    The target of a streaming request's delivery: the handler's run sends each
    chunk here, in order, then resolves the ordinary reply once, which ends
    the stream.
    """

    __slots__ = ()

    @abc.abstractmethod
    async def send_chunk(self, chunk: bytes) -> None:
        """Send one chunk, waiting for credit first; raises RunnerUnavailable once
        the caller is gone."""

    @abc.abstractmethod
    def resolve(self, reply: bytes) -> None:
        """End the stream with ``reply``; never raises, and a second end is ignored."""


class ChunkReceiver(abc.ABC):
    """A caller's end of a stream, fed by the link its request went out on."""

    __slots__ = ()

    @property
    @abc.abstractmethod
    def window(self) -> int:
        """The credits granted with the request."""

    @abc.abstractmethod
    def receive_chunk(self, chunk: bytes) -> bool:
        """One chunk from the peer; False when it had no credit (the peer overran)."""

    @abc.abstractmethod
    def grant_with(self, grant: Callable[[int], None]) -> None:
        """Send credits back through ``grant`` from now on (the request's link)."""

    @abc.abstractmethod
    def resolve(self, reply: bytes) -> None:
        """The stream's end, or the link's failure."""
