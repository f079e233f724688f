"""Entity protocols: what an entity type accepts and answers, apart from any handler.

A client imports the protocol (this module's objects and your msgspec
payload types) without importing handler code, so a process that only sends
never loads the code that handles.

Example::

    class Deposit(msgspec.Struct):
        amount: int
        transfer_id: str

    class Overdrawn(Exception):
        pass

    Account = Entity("Account")
    deposit = Account.rpc(
        "deposit", Deposit, int,
        errors=(Overdrawn,),
        primary_key=lambda p: p.transfer_id,
        persisted=True,
    )
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import attrs
import msgspec

from .core.hashing import ShardId, shard_index
from .core.reserved import RESERVED_PREFIX
from .core.streaming import MAX_WINDOW
from .state import State, StateCodec

if TYPE_CHECKING:
    from .config import EntityOptions
    from .runtime.context import EntityContext

P = TypeVar("P")
S = TypeVar("S")
C = TypeVar("C")
H = TypeVar("H")
T = TypeVar("T", bound=msgspec.Struct)

_IMPLEMENTS = "__trio_cluster_rpc__"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _check_name(kind: str, name: str) -> None:
    if not name or not set(name) <= _NAME_CHARS:
        raise ValueError(f"{kind} name must be letters, digits, '_', '-' or '.': {name!r}")


@attrs.frozen(eq=False, repr=False)
class Rpc(Generic[P, S]):
    """One request/reply exchange an entity type accepts.

    Declared ``errors`` are exceptions the handler raises on purpose; they are
    rebuilt on the caller's side from their ``args`` (which must therefore be
    msgpack-encodable) and raised there. Any other exception is a defect.

    ``primary_key`` makes a persisted request idempotent: a second request
    with the same key never runs the handler and gets the first one's reply.
    Idempotency needs the stored reply, so it requires ``persisted=True``.

    ``interruptible=False`` keeps a handler running to its end when its
    caller stops waiting: for work that must not be cut short halfway.

    ``stream``: the handler is an async generator and ``success_type`` the
    type of each chunk it yields (declared with :meth:`Entity.stream`, which
    wraps it in a :class:`StreamRpc`, so that ``ask`` cannot take it).
    """

    entity: Entity
    name: str
    payload_type: Any
    success_type: Any
    errors: tuple[type[Exception], ...]
    primary_key: Callable[[P], str] | None
    persisted: bool
    interruptible: bool = True
    stream: bool = False
    window: int = 0
    """A persisted stream's credit window, declared with it (0: not one)."""
    payload_decoder: msgspec.msgpack.Decoder[P] = attrs.field(init=False)
    success_decoder: msgspec.msgpack.Decoder[S] = attrs.field(init=False)
    errors_by_name: Mapping[str, type[Exception]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # Decoders are built once here: building one per message would
        # dominate the cost of small messages.
        object.__setattr__(self, "payload_decoder", msgspec.msgpack.Decoder(self.payload_type))
        object.__setattr__(self, "success_decoder", msgspec.msgpack.Decoder(self.success_type))
        object.__setattr__(self, "errors_by_name", {e.__name__: e for e in self.errors})

    def __repr__(self) -> str:
        return f"<Rpc {self.entity.name}.{self.name}>"

    def handler(self, method: Callable[[H, P], Awaitable[S]]) -> Callable[[H, P], Awaitable[S]]:
        """Mark a handler-class method as this RPC's implementation.

        The type checker verifies the method takes this RPC's payload and
        returns its success type.
        """
        setattr(method, _IMPLEMENTS, self)
        return method


@attrs.frozen(eq=False, repr=False)
class StreamRpc(Generic[P, C]):
    """An RPC whose handler yields a stream of ``C`` chunks (see :meth:`Entity.stream`).

    A wrapper rather than an :class:`Rpc` subclass: its handler has another
    shape (an async generator, not a coroutine), and ``ask``, ``tell`` and
    ``broadcast``, which take an ``Rpc``, refuse it before it is sent.
    """

    rpc: Rpc[P, C]

    @property
    def entity(self) -> Entity:
        return self.rpc.entity

    @property
    def name(self) -> str:
        return self.rpc.name

    def __repr__(self) -> str:
        return f"<StreamRpc {self.entity.name}.{self.name}>"

    def handler(
        self, method: Callable[[H, P], AsyncIterator[C]]
    ) -> Callable[[H, P], AsyncIterator[C]]:
        """Mark an async generator method as this stream's implementation: it yields
        chunks of the declared type, and its end (return, a declared error, a
        defect) ends the stream."""
        setattr(method, _IMPLEMENTS, self.rpc)
        return method


@attrs.frozen(eq=False, repr=False)
class Entity:
    """An entity type: a name, a shard group, and the RPCs it accepts."""

    name: str
    shard_group: str = "default"
    rpcs: dict[str, Rpc[Any, Any]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        _check_name("entity", self.name)
        _check_name("shard group", self.shard_group)
        if self.shard_group.startswith(RESERVED_PREFIX):
            raise ValueError(
                f"shard group names starting with {RESERVED_PREFIX!r} are reserved for the "
                f"cluster's own services: {self.shard_group!r}"
            )

    def __repr__(self) -> str:
        return f"<Entity {self.name}>"

    @overload
    def rpc(
        self,
        name: str,
        payload: type[P],
        success: type[S],
        *,
        errors: tuple[type[Exception], ...] = (),
        primary_key: Callable[[P], str] | None = None,
        persisted: bool = False,
        interruptible: bool = True,
    ) -> Rpc[P, S]: ...

    @overload
    def rpc(
        self,
        name: str,
        payload: object,
        success: type[S],
        *,
        errors: tuple[type[Exception], ...] = (),
        primary_key: Callable[[Any], str] | None = None,
        persisted: bool = False,
        interruptible: bool = True,
    ) -> Rpc[Any, S]: ...

    def rpc(
        self,
        name: str,
        payload: Any,
        success: Any,
        *,
        errors: tuple[type[Exception], ...] = (),
        primary_key: Callable[[Any], str] | None = None,
        persisted: bool = False,
        interruptible: bool = True,
    ) -> Rpc[Any, Any]:
        """Declare an RPC.

        ``payload`` may be a union of tagged msgspec Structs (annotate the
        result, e.g. ``draw: Rpc[Circle | Square, float] = ...``): one RPC
        then accepts a family of message shapes and the handler ``match``es
        on them. Use ``type(None)`` as ``success`` for RPCs that return nothing.
        ``interruptible=False``: the handler runs to its end even when its
        caller stops waiting (see ``Client.ask``'s ``interrupt``).
        """
        if primary_key is not None and not persisted:
            raise ValueError(
                f"{self.name}.{name}: a primary key needs persisted=True, "
                "because a duplicate is answered from the stored reply"
            )
        return self._declare(
            Rpc(self, name, payload, success, errors, primary_key, persisted, interruptible)
        )

    def stream(
        self,
        name: str,
        payload: type[P],
        chunk: type[C],
        *,
        errors: tuple[type[Exception], ...] = (),
        persisted: bool = False,
        primary_key: Callable[[P], str] | None = None,
        window: int = 16,
    ) -> StreamRpc[P, C]:
        """Declare a streaming RPC: the handler yields ``chunk`` values, which the
        caller iterates (``Client.stream``) with a bounded window in flight.

        Volatile by default, and then always interruptible: a caller that
        stops iterating cancels the handler (its ``finally`` blocks run),
        which would otherwise wait for ever for room in the window.
        ``persisted=True``: the request and every chunk are stored, and the
        caller's progress too, so after a crash or a shard move the handler
        runs again from ``ctx.request.resume_from``, the first chunk its
        caller did not acknowledge; ``window`` (chunks stored ahead of the
        caller) is then part of the declaration, known to both ends. See
        docs/concepts.md (Streaming replies).
        """
        if primary_key is not None and not persisted:
            raise ValueError(f"{self.name}.{name}: a primary key needs persisted=True")
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"a stream window is 1..{MAX_WINDOW} chunks (got {window})")
        rpc: Rpc[P, C] = Rpc(
            self,
            name,
            payload,
            chunk,
            errors,
            primary_key,
            persisted,
            not persisted,
            stream=True,
            window=window if persisted else 0,
        )
        return StreamRpc(self._declare(rpc))

    def _declare(self, rpc: Rpc[P, S]) -> Rpc[P, S]:
        _check_name("rpc", rpc.name)
        if rpc.name in self.rpcs:
            raise ValueError(f"{self.name} already has an RPC named {rpc.name!r}")
        for error in rpc.errors:
            if not (isinstance(error, type) and issubclass(error, Exception)):
                raise TypeError(
                    f"{self.name}.{rpc.name}: declared errors must be Exception classes"
                )
        self.rpcs[rpc.name] = rpc
        return rpc

    def shard_of(self, entity_id: str, shards_per_group: int) -> ShardId:
        return ShardId(self.shard_group, shard_index(entity_id, shards_per_group))

    @overload
    def implement(
        self,
        handler: Callable[[EntityContext], object],
        options: EntityOptions | None = None,
    ) -> Implementation: ...

    @overload
    def implement(
        self,
        handler: Callable[[EntityContext, State[T]], object],
        options: EntityOptions | None = None,
        *,
        state: type[T],
        initial: Callable[[], T] | None = None,
    ) -> Implementation: ...

    def implement(
        self,
        handler: Callable[..., object],
        options: EntityOptions | None = None,
        *,
        state: type[Any] | None = None,
        initial: Callable[[], Any] | None = None,
    ) -> Implementation:
        """Pair this protocol with a handler class, for a runner to host.

        Every RPC must be implemented by exactly one method marked with
        ``@rpc.handler``; a missing or foreign one is an error now, not when
        the first message arrives.

        With ``state`` (a msgspec Struct class) the entity has durable state:
        the handler class is called as ``handler(ctx, state)`` with a
        :class:`~trio_cluster.State` holding the last committed value, or
        ``initial()`` (default: ``state()``) for an entity that has none.
        The type checker checks that the handler takes ``State[state]``.
        """
        codec = None if state is None else StateCodec(state, initial)
        return Implementation(self, handler, options, codec)


@attrs.frozen(eq=False)
class Implementation:
    """An entity type, its handler class, options overriding the runner's defaults,
    and the codec of its durable state (None: the entity keeps none).

    The handler class is called with an :class:`~trio_cluster.EntityContext`
    (and its :class:`~trio_cluster.State`, with durable state) each time an
    entity is activated, and again after a defect; instance attributes are
    in-memory state, lost then.
    """

    entity: Entity
    handler: Callable[..., object]
    options: EntityOptions | None = None
    state: StateCodec | None = None
    methods: Mapping[str, Callable[[Any, Any], Any]] = attrs.field(init=False)
    """Each RPC's handler method: a coroutine function, or an async generator
    function for a stream."""
    on_activate: Callable[[Any], Awaitable[None]] | None = attrs.field(init=False)
    on_passivate: Callable[[Any], Awaitable[None]] | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "methods", _collect_methods(self.entity, self.handler))
        for hook in ("on_activate", "on_passivate"):
            object.__setattr__(self, hook, getattr(self.handler, hook, None))


def _collect_methods(
    entity: Entity, handler: Callable[[Any], object]
) -> dict[str, Callable[[Any, Any], Any]]:
    methods: dict[str, Callable[[Any, Any], Any]] = {}
    for klass in reversed(getattr(handler, "__mro__", (handler,))):
        for attr in vars(klass).values():
            rpc = getattr(attr, _IMPLEMENTS, None)
            if rpc is None:
                continue
            if rpc.entity is not entity:
                raise TypeError(f"{handler!r} implements {rpc!r}, which belongs to another entity")
            if rpc.stream != inspect.isasyncgenfunction(attr):
                shape = "an async generator" if rpc.stream else "a coroutine function"
                raise TypeError(f"{handler!r} must implement {rpc!r} as {shape}")
            methods[rpc.name] = attr
    missing = sorted(set(entity.rpcs) - set(methods))
    if missing:
        raise TypeError(f"{handler!r} does not implement {entity.name} RPCs: {', '.join(missing)}")
    return methods
