"""Durable entity state: a msgspec Struct an entity keeps across passivation, moves and crashes.

Declared with the implementation (``Entity.implement(Handler, state=CartState)``),
handed to the handler class with its context (``Handler(ctx, state)``), and
read and changed in handlers as ``state.value``. When it is stored is the
runtime's business: with the reply of every persisted request that changed
it, in the same transaction; for volatile requests, as
``EntityOptions.state_save`` says (see docs/concepts.md, "Entity state").

Evolving a state type: encoded as msgpack maps of field names (declare
state Structs without ``array_like``), so a field added with a default
decodes from old snapshots, and a removed field is ignored. Renaming a
field or changing its type makes old snapshots undecodable: the entity then
refuses requests with SerializationError until the state is fixed, and no
shard is harmed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

__all__ = ["State", "StateCodec"]

S = TypeVar("S", bound=msgspec.Struct)


class State(Generic[S]):
    """One entity's state: ``value`` is the Struct to read and change in handlers."""

    __slots__ = ("_initial", "value")

    def __init__(self, value: S, initial: Callable[[], S]) -> None:
        self.value = value
        self._initial = initial

    def delete(self) -> None:
        """Forget this entity's state: ``value`` starts again from the initial one.

        A state equal to the initial one is not stored, so this deletes the
        stored snapshot (with the reply, for a persisted request); the
        entity no longer appears in ``Runner.stored_state_ids``.
        """
        self.value = self._initial()


class StateCodec:
    """Encodes and decodes one entity type's state; built once per implementation."""

    __slots__ = ("_decoder", "_encoder", "initial", "initial_bytes", "type")

    def __init__(self, state_type: Any, initial: Callable[[], Any] | None) -> None:
        if not (isinstance(state_type, type) and issubclass(state_type, msgspec.Struct)):
            raise TypeError(f"state must be a msgspec.Struct class (got {state_type!r})")
        self.type = state_type
        self.initial: Callable[[], Any] = initial or state_type
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(state_type)
        self.initial_bytes = self.encode(self.initial())

    def encode(self, value: Any) -> bytes:
        return self._encoder.encode(value)

    def decode(self, data: bytes) -> Any:
        return self._decoder.decode(data)

    def holder(self, data: bytes | None) -> State[Any]:
        """The State of an entity whose stored snapshot is ``data`` (None: it has none)."""
        value = self.initial() if data is None else self.decode(data)
        return State(value, self.initial)
