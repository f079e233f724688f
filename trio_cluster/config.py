"""Runtime configuration: typed, validated, loadable from a mapping or the environment.

Every class validates in ``__init__`` (attrs validators), so a config built in code is
as trustworthy as one loaded from a file.  Loading goes through one cattrs converter
that is strict about types (no silent ``1.5 -> 1``, ``"false" -> True`` or
``"ab" -> ("a", "b")``) and rejects unknown keys, since a misspelt setting that is
quietly ignored is worse than a crash at startup.  Problems are reported together, as
one :class:`ConfigError` naming each field by its full path: every bad type and
unknown key at once, but only the first out-of-range value of each section, since
range checks run in the section's ``__init__``.

The settings classes of other modules (``TransportConfig``, ``LeaseTiming``) load through
the same :func:`load_mapping` and :func:`load_env`, so every section follows one set of
rules, and one environment scheme: ``ShardingConfig`` reads ``TRIO_CLUSTER_<FIELD>``, the
others ``TRIO_CLUSTER_<SECTION>_<FIELD>``, and :func:`env_variables` lists them.
"""

from __future__ import annotations

import os
import re
import ssl
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Self, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

from trio_cluster.core.retry import RetryPolicy
from trio_cluster.core.validation import Validator as _Validator
from trio_cluster.core.validation import number

__all__ = [
    "ENV_PREFIX",
    "LEASE_ENV_PREFIX",
    "TRANSPORT_ENV_PREFIX",
    "ConfigError",
    "EntityOptions",
    "RetryPolicy",
    "ShardingConfig",
    "env_variables",
]

_T = TypeVar("_T")

ENV_PREFIX = "TRIO_CLUSTER_"
"""``ShardingConfig``'s variables; the other sections' live under it, named below."""
_TRANSPORT_SECTION = "TRANSPORT_"
_LEASE_SECTION = "LEASE_"
TRANSPORT_ENV_PREFIX = ENV_PREFIX + _TRANSPORT_SECTION
"""``TransportConfig.from_env``'s variables: ``TRIO_CLUSTER_TRANSPORT_PORT``..."""
LEASE_ENV_PREFIX = ENV_PREFIX + _LEASE_SECTION
"""``LeaseTiming.from_env``'s variables: ``TRIO_CLUSTER_LEASE_HEARTBEAT_INTERVAL``..."""


class ConfigError(ValueError):
    """One or more invalid settings.

    ``fields`` holds ``(path, message)`` pairs, the path dotted through nested
    sections (``entity_defaults.mailbox_capacity``), or the variable's name for an
    unknown environment variable.
    """

    def __init__(self, fields: Sequence[tuple[str, str]]) -> None:
        self.fields = list(fields)
        # The pairs, not the rendered text, are the args, so the error pickles.
        super().__init__(self.fields)

    def __str__(self) -> str:
        return "; ".join(f"{path}: {message}" if path else message for path, message in self.fields)


# --- validators --------------------------------------------------------------------
# Errors read "<field>: <reason>"; _problems() relies on that prefix to report a
# failure raised by __init__ under the field's full path.


def _instance_of(cls: type, description: str) -> _Validator:
    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        # bool is an int, but True is not a valid RetryPolicy or mailbox size.
        if not isinstance(value, cls) or (cls is not bool and isinstance(value, bool)):
            raise TypeError(f"{attribute.name}: must be {description} (got {value!r})")

    return check


# Group names appear in storage keys ("default/17") and in comma-separated environment
# variables, so neither "/" nor "," (nor anything exotic) may appear in one.
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _check_group_names(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    name = attribute.name
    if not isinstance(value, tuple) or not all(isinstance(group, str) for group in value):
        raise TypeError(f"{name}: must be a tuple of strings (got {value!r})")
    if not value:
        raise ValueError(f"{name}: must name at least one group")
    for group in value:
        if not _GROUP_NAME.fullmatch(group):
            raise ValueError(
                f"{name}: {group!r} is not a valid group name (use letters, digits, '_', '-')"
            )
    duplicates = sorted({group for group in value if value.count(group) > 1})
    if duplicates:
        raise ValueError(f"{name}: duplicate group names {duplicates}")


StateSave = Literal["request", "interval", "passivation"]
STATE_SAVES: tuple[StateSave, ...] = ("request", "interval", "passivation")


def _one_of(choices: Sequence[str]) -> _Validator:
    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ValueError(
                f"{attribute.name}: must be one of {', '.join(choices)} (got {value!r})"
            )

    return check


# --- settings ----------------------------------------------------------------------


@attrs.frozen
class EntityOptions:
    """Per-entity-type behaviour; ``ShardingConfig.entity_defaults`` is the fallback."""

    mailbox_capacity: int = attrs.field(default=100, validator=number(minimum=1, integer=True))
    """Messages queued per entity before senders wait: the backpressure bound."""
    max_idle_time: float = attrs.field(default=300.0, validator=number(minimum=0, inclusive=False))
    """Seconds without a message before the entity is passivated to free memory."""
    concurrency: int = attrs.field(default=1, validator=number(minimum=1, integer=True))
    """Messages handled at once; 1 gives the actor model's one-at-a-time guarantee."""
    defect_retry: RetryPolicy = attrs.field(
        default=RetryPolicy(
            base_delay=0.1, factor=2.0, max_delay=5.0, max_attempts=5, max_elapsed=30.0
        ),
        validator=_instance_of(RetryPolicy, "a RetryPolicy"),
    )
    """Restart schedule after the entity crashes, before it is given up on."""
    keep_alive: bool = attrs.field(default=False, validator=_instance_of(bool, "a bool"))
    """Opt out of idle passivation, for entities that hold timers or subscriptions."""
    state_save: StateSave = attrs.field(default="interval", validator=_one_of(STATE_SAVES))
    """When durable state changed by volatile requests is stored (persisted requests store
    it with their reply, always): ``"request"`` before each reply, ``"interval"`` at most
    every ``state_save_interval`` and on passivation and handoff, ``"passivation"`` only
    then."""
    state_save_interval: float = attrs.field(
        default=5.0, validator=number(minimum=0, inclusive=False)
    )
    max_state_size: int = attrs.field(
        default=1024 * 1024, validator=number(minimum=1, integer=True)
    )
    """Bytes of an encoded state; a change past it fails its request with SerializationError."""
    hook_timeout: float = attrs.field(default=10.0, validator=number(minimum=0, inclusive=False))
    """Bound on a handler's ``on_activate`` and ``on_passivate``."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """Load per-entity-type overrides; same rules as ``ShardingConfig.from_mapping``."""
        return load_mapping(cls, data)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers) that ``from_mapping`` accepts back."""
        return unstructure(self)


@attrs.frozen
class ShardingConfig:
    """Settings shared by every runner of a cluster.

    ``shards_per_group`` and ``shard_groups`` define the persisted shard layout: all
    runners must agree on them, and changing them moves entities between shards.
    """

    shards_per_group: int = attrs.field(default=100, validator=number(minimum=1, integer=True))
    shard_groups: tuple[str, ...] = attrs.field(default=("default",), validator=_check_group_names)
    max_resident_entities: int = attrs.field(
        default=100_000, validator=number(minimum=1, integer=True)
    )
    """Per runner; beyond it the least recently used idle entities are passivated."""
    send_timeout: float = attrs.field(default=10.0, validator=number(minimum=0, inclusive=False))
    """Seconds an ask waits for its reply unless the caller says otherwise."""
    entity_termination_timeout: float = attrs.field(default=15.0, validator=number(minimum=0))
    """Seconds entities get to finish on shutdown or shard handover before cancellation."""
    send_retry: RetryPolicy = attrs.field(
        default=RetryPolicy(
            base_delay=0.01, factor=2.0, max_delay=0.5, max_attempts=20, max_elapsed=5.0
        ),
        validator=_instance_of(RetryPolicy, "a RetryPolicy"),
    )
    """Resends while shards move (EntityNotAssignedToRunner, RunnerUnavailable)."""
    entity_defaults: EntityOptions = attrs.field(
        default=EntityOptions(), validator=_instance_of(EntityOptions, "an EntityOptions")
    )
    max_scheduled_per_shard: int = attrs.field(
        default=1000, validator=number(minimum=1, integer=True)
    )
    """Requests held in memory per shard until their ``deliver_at``. A volatile one past
    it is refused with MailboxFull; a persisted one stays in storage, read back when due."""
    max_message_size: int = attrs.field(
        default=8 * 1024 * 1024, validator=number(minimum=1024, integer=True)
    )
    """Bytes of an encoded payload or reply; beyond it SerializationError. Keep it under
    ``TransportConfig.max_frame_size``, so that whatever one runner accepts, every other
    can carry."""
    membership_poll_interval: float = attrs.field(
        default=15.0, validator=number(minimum=0, inclusive=False)
    )
    """Seconds between safety re-reads of the live runners. Changes are announced
    (joins, leaves, and deaths by the dead runner's watcher), so this only bounds how
    long a change nobody announced goes unseen."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """Load from nested plain data, as parsed from TOML, JSON or YAML.

        Missing keys take their defaults, nested sections included.
        """
        return load_mapping(cls, data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> Self:
        """Load from environment variables, e.g. ``TRIO_CLUSTER_SHARDS_PER_GROUP=50``.

        Nested fields use a double underscore (``TRIO_CLUSTER_SEND_RETRY__MAX_ATTEMPTS``),
        tuples are comma-separated (``TRIO_CLUSTER_SHARD_GROUPS=a,b``), booleans accept
        true/false, yes/no, on/off and 1/0.  Any other variable with the prefix is an
        error: with no schema to catch typos, a silently ignored variable is the most
        likely way to misconfigure a deployment.  The exceptions are ``<prefix>TRANSPORT_*``
        and ``<prefix>LEASE_*``, which belong to ``TransportConfig.from_env`` and
        ``LeaseTiming.from_env`` (and are checked there).
        """
        others = (prefix + _TRANSPORT_SECTION, prefix + _LEASE_SECTION)
        return load_env(cls, environ, prefix, others=others)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers) that ``from_mapping`` accepts back."""
        return unstructure(self)


# --- loading from a mapping ----------------------------------------------------------


class _InvalidValueError(ValueError):
    """A value our strict hooks refused; its text is the message shown to the user."""


def _structure_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidValueError(f"expected an integer (got {value!r})")
    return value


def _structure_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _InvalidValueError(f"expected a number (got {value!r})")
    try:
        return float(value)
    except OverflowError:
        raise _InvalidValueError(f"expected a finite number (got {value!r})") from None


def _structure_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise _InvalidValueError(f"expected true or false (got {value!r})")
    return value


def _structure_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise _InvalidValueError(f"expected a string (got {value!r})")
    return value


def _structure_bytes(value: Any, _: Any) -> bytes:
    # cattrs would call bytes(value): bytes(3) is three zero bytes.  The value may be a
    # secret, so the message names its type only.
    if not isinstance(value, bytes):
        raise _InvalidValueError(f"expected bytes (got {type(value).__name__})")
    return value


def _structure_ssl_context(value: Any, _: Any) -> ssl.SSLContext:
    # Plain data cannot describe one: a context is built in code and passed through.
    if not isinstance(value, ssl.SSLContext):
        raise _InvalidValueError(
            f"expected an ssl.SSLContext, built in code (got {type(value).__name__})"
        )
    return value


def _structure_str_tuple(value: Any, _: Any) -> tuple[str, ...]:
    # A bare string is iterable, so cattrs would happily split "ab" into ("a", "b").
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _InvalidValueError(f"expected a list of strings (got {value!r})")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise _InvalidValueError(f"expected a list of strings (item {index} is {item!r})")
    return tuple(value)


def _is_literal(field_type: Any) -> bool:
    return bool(typing.get_origin(field_type) is Literal)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(bytes, _structure_bytes)
    converter.register_structure_hook(ssl.SSLContext, _structure_ssl_context)
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    # A choice is a string here; the class's own validator names the choices.
    converter.register_structure_hook_func(_is_literal, _structure_str)

    def attrs_hook(cls: Any) -> Callable[[Any, Any], Any]:
        structure_fields = make_dict_structure_fn(cls, converter)
        # A partial section overrides the field's own default, not the section class's
        # defaults: {"send_retry": {"max_attempts": 3}} must keep send_retry's 0.01 s
        # base delay rather than fall back to RetryPolicy's 0.05 s.
        section_defaults = {
            field.name: converter.unstructure(field.default)
            for field in attrs.fields(cls)
            if attrs.has(type(field.default))
        }

        def structure(value: Any, _: Any) -> Any:
            # Checked up front: cattrs would test `"field" in value` on a string and
            # report its characters as unknown keys.
            if not isinstance(value, Mapping):
                raise _InvalidValueError(f"expected a mapping (got {value!r})")
            return structure_fields(_overlay(section_defaults, value), cls)

        return structure

    converter.register_structure_hook_factory(attrs.has, attrs_hook)
    return converter


def _overlay(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` overridden by ``given``, merging nested mappings key by key."""
    merged = dict(defaults)
    for key, value in given.items():
        default = merged.get(key)
        if isinstance(value, Mapping) and isinstance(default, Mapping):
            merged[key] = _overlay(default, value)
        else:
            merged[key] = value
    return merged


_CONVERTER = _make_converter()


def unstructure(instance: object) -> dict[str, Any]:
    """A settings instance as the nested data ``load_mapping`` accepts back.

    Plain data, except the values only code can build (bytes, ``ssl.SSLContext``),
    which are returned as they are.
    """
    data: dict[str, Any] = _CONVERTER.unstructure(instance)
    return data


def load_mapping(cls: type[_T], data: object) -> _T:
    """Structure ``data`` into the attrs class ``cls``, or raise one ConfigError."""
    try:
        return _CONVERTER.structure(data, cls)
    except (ClassValidationError, _InvalidValueError) as exc:
        raise ConfigError(list(_problems(exc, "", cls))) from exc


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _problems(exc: BaseException, path: str, cls: Any) -> Iterator[tuple[str, str]]:
    """Flatten cattrs' nested errors into ``(path, message)`` pairs.

    Like ``cattrs.transform_error``, but yielding pairs rather than text, and placing
    an attrs validator's error (raised by ``__init__``, which cattrs can only pin on
    the class) under the field it names.
    """
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _problems(sub, _join(path, note.name), note.type)
        for sub in without:
            yield from _problems(sub, path, exc.cl)
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            yield _join(path, key), "unknown field"
    elif isinstance(exc, _InvalidValueError):
        yield path, str(exc)
    elif isinstance(exc, TypeError | ValueError) and attrs.has(cls):
        field, separator, reason = str(exc).partition(": ")
        if separator and field in attrs.fields_dict(cls):
            yield _join(path, field), reason
        else:
            yield path, str(exc)
    else:
        yield path, f"invalid value ({exc!r})"


# --- loading from the environment --------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_FILE_SUFFIX = "_FILE"
"""A bytes field (a secret) can also be read from a file: a mounted secret, rather than
a value that shows in ``ps e``, ``/proc/<pid>/environ`` and crash reports."""

_EnvKind = Literal["value", "file", "section", "code"]


@attrs.frozen
class _EnvEntry:
    path: tuple[str, ...]
    field_type: Any  # without "| None": an unset variable is what gives the None default
    kind: _EnvKind


def _without_none(field_type: Any) -> Any:
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        kept = [arg for arg in typing.get_args(field_type) if arg is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return field_type


def _has_env_syntax(field_type: Any) -> bool:
    return (
        field_type in (bool, int, float, str, bytes)
        or field_type == tuple[str, ...]
        or _is_literal(field_type)
    )


def _env_entries(
    cls: type, prefix: str, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, _EnvEntry]]:
    """Every variable name ``cls`` knows under ``prefix``, sections and code-only ones included.

    One walk of the attrs fields serves both the loader and :func:`env_variables`, so
    the documented list cannot differ from what is accepted.
    """
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        variable = prefix + field.name.upper()
        field_path = (*path, field.name)
        field_type = _without_none(hints[field.name])
        if attrs.has(field_type):
            yield variable, _EnvEntry(field_path, field_type, "section")
            yield from _env_entries(field_type, variable + "__", field_path)
        elif not _has_env_syntax(field_type):
            yield variable, _EnvEntry(field_path, field_type, "code")
        else:
            yield variable, _EnvEntry(field_path, field_type, "value")
            if field_type is bytes:
                yield variable + _FILE_SUFFIX, _EnvEntry(field_path, field_type, "file")


def env_variables(cls: type, prefix: str) -> dict[str, str]:
    """The variables ``cls.from_env(prefix=prefix)`` accepts, each to its field's dotted path.

    A bytes field has two (``..._SECRET`` and ``..._SECRET_FILE``), both to one path.
    """
    return {
        variable: ".".join(entry.path)
        for variable, entry in _env_entries(cls, prefix)
        if entry.kind in ("value", "file")
    }


def _parse_env_value(field_type: Any, raw: str) -> Any:
    text = raw.strip()
    if field_type is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise _InvalidValueError(f"expected true or false (got {raw!r})")
    if field_type is int or field_type is float:
        try:
            return field_type(text)
        except ValueError:
            kind = "an integer" if field_type is int else "a number"
            raise _InvalidValueError(f"expected {kind} (got {raw!r})") from None
    if field_type is str:
        return raw
    if field_type is bytes:
        # Taken as it is, unstripped: a secret's spaces are part of it.  Never echoed.
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError:
            raise _InvalidValueError("expected UTF-8 text") from None
    if field_type == tuple[str, ...]:
        return tuple(item.strip() for item in text.split(",")) if text else ()
    # A Literal: _has_env_syntax admits nothing else.
    return text


def _read_env_file(path: str) -> bytes:
    """The file's bytes, less trailing line breaks (which ``echo`` and editors add)."""
    try:
        with open(path, "rb") as file:
            return file.read().rstrip(b"\r\n")
    except OSError as exc:
        raise _InvalidValueError(f"cannot read {path!r} ({exc.strerror})") from None


def load_env(
    cls: type[_T],
    environ: Mapping[str, str] | None,
    prefix: str,
    *,
    others: Sequence[str] = (),
) -> _T:
    """Load ``cls`` from the variables starting with ``prefix`` (``os.environ`` if None).

    Variables starting with one of ``others`` belong to another section and are
    skipped; any other variable with the prefix must name a field.
    """
    entries = dict(_env_entries(cls, prefix))
    data: dict[str, Any] = {}
    variable_of: dict[str, str] = {}  # field path -> the variable that set it
    problems: list[tuple[str, str]] = []
    for variable, raw in sorted((os.environ if environ is None else environ).items()):
        if not variable.startswith(prefix):
            continue
        name = prefix + variable.removeprefix(prefix).upper()
        if name.startswith(tuple(others)):
            continue
        entry = entries.get(name)
        if entry is None:
            problems.append((variable, f"unknown setting (no such field in {cls.__name__})"))
            continue
        dotted = ".".join(entry.path)
        if entry.kind == "section":
            problems.append((dotted, f"is a section: set its fields, as in {variable}__<FIELD>"))
            continue
        if entry.kind == "code":
            problems.append(
                (dotted, f"cannot be set from the environment, only in code ({variable})")
            )
            continue
        if dotted in variable_of:
            problems.append((dotted, f"set by both {variable_of[dotted]} and {variable}: use one"))
            continue
        try:
            if entry.kind == "file":
                value = _read_env_file(raw)
            else:
                value = _parse_env_value(entry.field_type, raw)
        except _InvalidValueError as exc:
            problems.append((dotted, f"{exc}, set by {variable}"))
            continue
        section = data
        for part in entry.path[:-1]:
            section = section.setdefault(part, {})
        section[entry.path[-1]] = value
        variable_of[dotted] = variable
    try:
        config = load_mapping(cls, data)
    except ConfigError as exc:
        for field_path, message in exc.fields:
            source = variable_of.get(field_path)
            problems.append((field_path, f"{message}, set by {source}" if source else message))
        raise ConfigError(problems) from exc
    if problems:
        raise ConfigError(problems)
    return config
