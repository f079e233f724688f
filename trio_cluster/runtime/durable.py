"""One entity's durable state, as its entity task keeps it: what is committed, what changed.

Pure bookkeeping, no I/O: the entity task loads a snapshot through its
shard, asks here what a request changed (an encoded snapshot to write, or
None), and says when a write was committed or must be forgotten. Every
state write of an entity goes through its own task, one at a time, so a
snapshot can never be overtaken by an older one.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..errors import SerializationError
from ..state import State, StateCodec
from ..storage.base import StateWrite


class StateUnreadable(SerializationError):
    """The entity's stored snapshot does not decode into its state type."""


class StateKeeper:
    __slots__ = ("_codec", "_committed", "_entity_id", "_entity_type", "_max_size", "holder")

    def __init__(self, codec: StateCodec, entity_type: str, entity_id: str, max_size: int) -> None:
        self._codec = codec
        self._entity_type = entity_type
        self._entity_id = entity_id
        self._max_size = max_size
        self.holder: State[Any] | None = None
        """The State handed to the handler; None until loaded (and after a rollback)."""
        self._committed = codec.initial_bytes
        """The encoding of what storage holds (the initial state's when it holds none)."""

    def load(self, data: bytes | None) -> State[Any]:
        """The State of the committed snapshot ``data``; StateUnreadable if it does not decode."""
        try:
            self.holder = self._codec.holder(data)
        except msgspec.MsgspecError as error:
            raise StateUnreadable(
                f"the stored state of {self._entity_type}/{self._entity_id} does not decode "
                f"into {self._codec.type.__name__}: {error}",
                entity_id=self._entity_id,
            ) from error
        self._committed = self._codec.initial_bytes if data is None else data
        return self.holder

    def change(self) -> tuple[StateWrite, bytes] | None:
        """What to write for the state as it is now (and its encoding), or None if unchanged.

        A state equal to the initial one is written as a deletion: an entity
        that keeps nothing has no row. SerializationError when the state
        cannot be encoded or is over the size limit.
        """
        if self.holder is None:
            return None
        try:
            encoded = self._codec.encode(self.holder.value)
        except (TypeError, ValueError, OverflowError, RecursionError) as error:
            raise SerializationError(
                f"the state of {self._entity_type}/{self._entity_id} cannot be encoded: {error}",
                entity_id=self._entity_id,
            ) from error
        if encoded == self._committed:
            return None
        if len(encoded) > self._max_size:
            raise SerializationError(
                f"the state of {self._entity_type}/{self._entity_id} encodes to "
                f"{len(encoded)} bytes, over max_state_size ({self._max_size})",
                entity_id=self._entity_id,
            )
        data = None if encoded == self._codec.initial_bytes else encoded
        return StateWrite(self._entity_type, self._entity_id, data), encoded

    @property
    def dirty(self) -> bool:
        """Whether the state differs from what storage holds (an encoding's worth of work)."""
        try:
            return self.change() is not None
        except SerializationError:
            return False

    def committed(self, encoded: bytes) -> None:
        self._committed = encoded

    def forget(self) -> None:
        """Drop the in-memory state (after a defect, or a write that did not commit):
        the next request starts again from what storage holds."""
        self.holder = None
