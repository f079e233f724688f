"""How runners reach each other: ``TransportConfig``, validated when it is built.

A bad value fails here, at start-up, naming the field, rather than at the
first connection (an empty secret, a ``str`` secret) or silently (a zero ping
interval closes every link at once). It loads from a mapping or the environment
by the rules of ``trio_cluster.config``, except its TLS contexts, which only code
can build.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, Self

import attrs

from ..config import TRANSPORT_ENV_PREFIX, load_env, load_mapping, unstructure
from ..core.frames import DEFAULT_MAX_FRAME_SIZE
from ..core.protocol import DEFAULT_MAX_UNSENT, PRE_AUTH_MAX_FRAME_SIZE
from ..core.validation import number

__all__ = ["MAX_NAME_LENGTH", "TransportConfig"]

MAX_NAME_LENGTH = 255
"""Cluster names and advertised hosts travel in the Hello, which must fit a
pre-authentication frame."""


def _text(*, optional: bool = False, empty: bool = False) -> Any:
    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            raise TypeError(f"{attribute.name}: must be a str (got {value!r})")
        if not value and not empty:
            raise ValueError(f"{attribute.name}: must not be empty")
        if len(value) > MAX_NAME_LENGTH or "\x00" in value:
            raise ValueError(
                f"{attribute.name}: must be at most {MAX_NAME_LENGTH} characters, without NUL"
            )

    return check


def _secret(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        raise TypeError(f"{attribute.name}: must be bytes, not str (encode it: secret.encode())")
    if not isinstance(value, bytes):
        raise TypeError(f"{attribute.name}: must be bytes or None (got {type(value).__name__})")
    if not value:
        # An empty key would "authenticate" with a MAC anyone can compute.
        raise ValueError(f"{attribute.name}: must be non-empty (or None for no authentication)")


def _tls(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, ssl.SSLContext):
        raise TypeError(f"{attribute.name}: must be an ssl.SSLContext or None (got {value!r})")


@attrs.frozen
class TransportConfig:
    """How runners reach each other.

    ``host`` and ``port`` are where this runner listens (port 0: any free
    one); ``advertise`` is the host peers should dial, when it differs.
    ``secret`` authenticates peers as members of ``cluster``. With
    ``tls_server`` (for accepted connections) and ``tls_client`` (for
    dialled ones, checked against the dialled host) links run over TLS,
    which also encrypts and protects what follows the handshake. When
    ``tls_server`` requires client certificates (``verify_mode =
    ssl.CERT_REQUIRED``: mutual TLS), an accepted peer must also present a
    certificate naming the host of the address it claims to be.

    The bounds are per runner: ``max_inbound_connections`` accepted
    connections at once, of which at most ``max_handshakes`` not yet
    authenticated, each of which must finish its TLS and cluster handshake
    within ``handshake_timeout``; ``max_unsent`` bytes queued for one peer
    before its link is closed; frames of at most ``max_frame_size`` bytes
    once authenticated (4 KiB before); ``max_requests_per_link`` requests
    from one peer in flight at once.
    """

    host: str = attrs.field(default="127.0.0.1", validator=_text())
    port: int = attrs.field(default=0, validator=number(minimum=0, maximum=65535, integer=True))
    advertise: str | None = attrs.field(default=None, validator=_text(optional=True))
    cluster: str = attrs.field(default="trio_cluster", validator=_text())
    secret: bytes | None = attrs.field(default=None, validator=_secret)
    connect_timeout: float = attrs.field(default=2.0, validator=number(minimum=0, inclusive=False))
    """Seconds to open a TCP connection to a peer."""
    handshake_timeout: float = attrs.field(
        default=2.0, validator=number(minimum=0, inclusive=False)
    )
    """Seconds for TLS and the cluster handshake, on either side of a connection."""
    ping_interval: float = attrs.field(default=1.0, validator=number(minimum=0, inclusive=False))
    """A peer silent for one interval is pinged; for two, its link is closed."""
    max_frame_size: int = attrs.field(
        default=DEFAULT_MAX_FRAME_SIZE,
        validator=number(minimum=PRE_AUTH_MAX_FRAME_SIZE, maximum=2**32 - 1, integer=True),
    )
    max_unsent: int = attrs.field(
        default=DEFAULT_MAX_UNSENT, validator=number(minimum=1, integer=True)
    )
    max_inbound_connections: int = attrs.field(
        default=512, validator=number(minimum=1, integer=True)
    )
    max_handshakes: int = attrs.field(default=64, validator=number(minimum=1, integer=True))
    max_requests_per_link: int = attrs.field(
        default=10_000, validator=number(minimum=1, integer=True)
    )
    """A peer's requests in flight at once on its link; more are refused with MailboxFull."""
    tls_server: ssl.SSLContext | None = attrs.field(default=None, validator=_tls)
    tls_client: ssl.SSLContext | None = attrs.field(default=None, validator=_tls)

    def __attrs_post_init__(self) -> None:
        if (self.tls_server is None) != (self.tls_client is None):
            raise ValueError("TLS needs both tls_server and tls_client: a runner accepts and dials")
        if self.max_unsent < self.max_frame_size:
            raise ValueError(
                f"max_unsent: must be at least max_frame_size ({self.max_frame_size}),"
                f" or a full frame could never be queued (got {self.max_unsent})"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """Load from nested plain data; same rules as ``ShardingConfig.from_mapping``.

        ``secret`` must be bytes here as in code (TOML and JSON have none: take it from
        the environment), and ``tls_server`` / ``tls_client`` ``ssl.SSLContext``s.
        """
        return load_mapping(cls, data)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, prefix: str = TRANSPORT_ENV_PREFIX
    ) -> Self:
        """Load from ``TRIO_CLUSTER_TRANSPORT_<FIELD>`` variables (``..._PORT=7000``).

        Same rules as ``ShardingConfig.from_env``. The secret is
        ``TRIO_CLUSTER_TRANSPORT_SECRET``, its UTF-8 bytes, or the bytes of the file
        named by ``TRIO_CLUSTER_TRANSPORT_SECRET_FILE`` less trailing line breaks (a
        mounted secret stays out of the process environment); not both. TLS is
        code-only: ``attrs.evolve(config, tls_server=..., tls_client=...)``.
        """
        return load_env(cls, environ, prefix)

    def to_mapping(self) -> dict[str, Any]:
        """The fields as ``from_mapping`` accepts them back (the secret as bytes)."""
        return unstructure(self)

    @property
    def mutual_tls(self) -> bool:
        """Whether accepted peers must present a certificate (and so prove their address)."""
        return self.tls_server is not None and self.tls_server.verify_mode == ssl.CERT_REQUIRED
