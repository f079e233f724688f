"""Configuration: validated in code, loaded strictly, errors named by field path."""

import functools
import pickle
import re
import ssl
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import TransportConfig
from trio_cluster.config import (
    ENV_PREFIX,
    LEASE_ENV_PREFIX,
    TRANSPORT_ENV_PREFIX,
    ConfigError,
    EntityOptions,
    ShardingConfig,
    env_variables,
)
from trio_cluster.core.retry import RetryPolicy
from trio_cluster.postgres.leases import LeaseTiming

# --- strategies ----------------------------------------------------------------------


def finite(min_value: float, max_value: float = 1e9) -> st.SearchStrategy[float]:
    return st.floats(min_value=min_value, max_value=max_value, allow_nan=False)


positive = finite(0).filter(lambda x: x > 0)

retry_policies = st.builds(
    RetryPolicy,
    base_delay=finite(0),
    factor=finite(1),
    max_delay=finite(0),
    max_attempts=st.integers(min_value=1, max_value=1000),
    max_elapsed=finite(0),
    jitter=finite(0, 1),
)
entity_options = st.builds(
    EntityOptions,
    mailbox_capacity=st.integers(min_value=1, max_value=10**6),
    max_idle_time=positive,
    concurrency=st.integers(min_value=1, max_value=1000),
    defect_retry=retry_policies,
    keep_alive=st.booleans(),
)
group_names = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
sharding_configs = st.builds(
    ShardingConfig,
    shards_per_group=st.integers(min_value=1, max_value=10**5),
    shard_groups=st.lists(group_names, min_size=1, max_size=4, unique=True).map(tuple),
    max_resident_entities=st.integers(min_value=1, max_value=10**7),
    send_timeout=positive,
    entity_termination_timeout=finite(0),
    send_retry=retry_policies,
    entity_defaults=entity_options,
)


names = st.from_regex(r"[a-z][a-z0-9.-]{0,30}", fullmatch=True)
transport_configs = st.builds(
    TransportConfig,
    host=names,
    port=st.integers(min_value=0, max_value=65535),
    advertise=st.none() | names,
    cluster=names,
    secret=st.none() | st.text(min_size=1).map(str.encode),
    connect_timeout=positive,
    handshake_timeout=positive,
    ping_interval=positive,
    max_frame_size=st.integers(min_value=4096, max_value=2**20),
    max_unsent=st.integers(min_value=2**20, max_value=2**30),
    max_inbound_connections=st.integers(min_value=1, max_value=10**4),
    max_handshakes=st.integers(min_value=1, max_value=10**4),
    max_requests_per_link=st.integers(min_value=1, max_value=10**6),
)
lease_timings = st.builds(
    LeaseTiming,
    heartbeat_interval=finite(0.001, 100),
    liveness_timeout=positive,
    keepalive_idle=st.integers(min_value=1, max_value=10**4),
    keepalive_interval=st.integers(min_value=1, max_value=10**4),
    keepalive_count=st.integers(min_value=1, max_value=100),
    user_timeout_ms=st.integers(min_value=1, max_value=10**7),
    idle_session_timeout_ms=st.just(0) | st.integers(min_value=100_001, max_value=10**7),
    pool_unreachable_timeout=positive,
)


def as_environ(data: dict[str, Any], prefix: str = ENV_PREFIX) -> dict[str, str]:
    """Render ``to_mapping()`` output the way an operator would write it."""
    environ: dict[str, str] = {}
    for key, value in data.items():
        name = prefix + key.upper()
        if value is None:
            continue  # unset: the default
        if isinstance(value, dict):
            environ.update(as_environ(value, name + "__"))
        elif isinstance(value, list):
            environ[name] = ",".join(value)
        elif isinstance(value, bool):
            environ[name] = "true" if value else "false"
        elif isinstance(value, bytes):
            environ[name] = value.decode()
        else:
            environ[name] = str(value)  # str(float) round-trips exactly
    return environ


def config_error(call: Any, *args: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        call(*args)
    return caught.value


# --- defaults ------------------------------------------------------------------------


def test_defaults() -> None:
    config = ShardingConfig()
    assert config.shards_per_group == 100
    assert config.shard_groups == ("default",)
    assert config.max_resident_entities == 100_000
    assert config.send_timeout == 10.0
    assert config.entity_termination_timeout == 15.0
    assert config.send_retry == RetryPolicy(
        base_delay=0.01, factor=2.0, max_delay=0.5, max_attempts=20, max_elapsed=5.0
    )
    assert config.entity_defaults == EntityOptions()


def test_entity_defaults() -> None:
    options = EntityOptions()
    assert options.mailbox_capacity == 100
    assert options.max_idle_time == 300.0
    assert options.concurrency == 1
    assert options.defect_retry == RetryPolicy(
        base_delay=0.1, factor=2.0, max_delay=5.0, max_attempts=5, max_elapsed=30.0
    )
    assert options.keep_alive is False


def test_empty_sources_give_defaults() -> None:
    assert ShardingConfig.from_mapping({}) == ShardingConfig()
    assert ShardingConfig.from_env({"PATH": "/usr/bin"}) == ShardingConfig()
    assert EntityOptions.from_mapping({}) == EntityOptions()


# --- mappings ------------------------------------------------------------------------


def test_mapping_round_trip_of_defaults() -> None:
    data = ShardingConfig().to_mapping()
    assert data["shard_groups"] == ["default"]  # plain data, ready for JSON
    assert data["send_retry"]["max_attempts"] == 20
    assert ShardingConfig.from_mapping(data) == ShardingConfig()


@given(sharding_configs)
def test_mapping_round_trip(config: ShardingConfig) -> None:
    assert ShardingConfig.from_mapping(config.to_mapping()) == config


@given(entity_options)
def test_entity_options_round_trip(options: EntityOptions) -> None:
    assert EntityOptions.from_mapping(options.to_mapping()) == options


def test_partial_section_keeps_the_fields_own_defaults() -> None:
    config = ShardingConfig.from_mapping(
        {"send_retry": {"max_attempts": 3}, "entity_defaults": {"defect_retry": {"jitter": 0}}}
    )
    # ShardingConfig.send_retry's defaults, not RetryPolicy's (base_delay 0.05).
    assert config.send_retry == RetryPolicy(
        base_delay=0.01, factor=2.0, max_delay=0.5, max_attempts=3, max_elapsed=5.0
    )
    assert config.entity_defaults.defect_retry.base_delay == 0.1
    assert config.entity_defaults.defect_retry.jitter == 0


def test_from_mapping() -> None:
    config = ShardingConfig.from_mapping(
        {"shards_per_group": 8, "shard_groups": ["a", "b"], "send_timeout": 2}
    )
    assert config.shards_per_group == 8
    assert config.shard_groups == ("a", "b")
    assert config.send_timeout == 2.0


# --- environment -----------------------------------------------------------------------


def test_from_env() -> None:
    config = ShardingConfig.from_env(
        {
            "TRIO_CLUSTER_SHARDS_PER_GROUP": "50",
            "TRIO_CLUSTER_SHARD_GROUPS": "a, b",
            "TRIO_CLUSTER_SEND_TIMEOUT": "2.5",
            "TRIO_CLUSTER_SEND_RETRY__MAX_ATTEMPTS": "3",
            "TRIO_CLUSTER_ENTITY_DEFAULTS__MAILBOX_CAPACITY": "10",
            "TRIO_CLUSTER_ENTITY_DEFAULTS__KEEP_ALIVE": "yes",
            "TRIO_CLUSTER_ENTITY_DEFAULTS__DEFECT_RETRY__JITTER": "0",
            "HOME": "/root",  # not ours: ignored
        }
    )
    assert config.shards_per_group == 50
    assert config.shard_groups == ("a", "b")
    assert config.send_timeout == 2.5
    assert config.send_retry.max_attempts == 3
    assert config.send_retry.base_delay == 0.01  # the rest of the section keeps its defaults
    assert config.entity_defaults.mailbox_capacity == 10
    assert config.entity_defaults.keep_alive is True
    assert config.entity_defaults.defect_retry.jitter == 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[("1", True), ("true", True), ("Yes", True), (" ON ", True)],
        *[("0", False), ("false", False), ("NO", False), ("off", False)],
    ],
)
def test_env_booleans(raw: str, expected: bool) -> None:
    config = ShardingConfig.from_env({"TRIO_CLUSTER_ENTITY_DEFAULTS__KEEP_ALIVE": raw})
    assert config.entity_defaults.keep_alive is expected


def test_env_custom_prefix() -> None:
    environ = {"APP_SHARDS_PER_GROUP": "7", "TRIO_CLUSTER_SHARDS_PER_GROUP": "nonsense"}
    assert ShardingConfig.from_env(environ, prefix="APP_").shards_per_group == 7


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_CLUSTER_MAX_RESIDENT_ENTITIES", "123")
    assert ShardingConfig.from_env().max_resident_entities == 123


@given(sharding_configs)
def test_env_round_trip(config: ShardingConfig) -> None:
    assert ShardingConfig.from_env(as_environ(config.to_mapping())) == config


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"shards_per_group": 0}, "shards_per_group", "must be >= 1 (got 0)"),
        ({"shards_per_group": "many"}, "shards_per_group", "expected an integer (got 'many')"),
        ({"shards_per_group": 1.5}, "shards_per_group", "expected an integer (got 1.5)"),
        ({"shards_per_group": True}, "shards_per_group", "expected an integer (got True)"),
        ({"send_timeout": 0}, "send_timeout", "must be > 0 (got 0.0)"),
        ({"send_timeout": "10"}, "send_timeout", "expected a number (got '10')"),
        ({"entity_termination_timeout": -1}, "entity_termination_timeout", "must be >= 0"),
        ({"shard_groups": []}, "shard_groups", "must name at least one group"),
        ({"shard_groups": "a,b"}, "shard_groups", "expected a list of strings (got 'a,b')"),
        ({"shard_groups": ["a", 1]}, "shard_groups", "expected a list of strings (item 1"),
        ({"shard_groups": ["a", "a"]}, "shard_groups", "duplicate group names ['a']"),
        ({"shard_groups": ["a/b"]}, "shard_groups", "'a/b' is not a valid group name"),
        ({"shard_groups": [""]}, "shard_groups", "'' is not a valid group name"),
        ({"send_retry": {"max_attempts": 0}}, "send_retry.max_attempts", "must be >= 1"),
        ({"send_retry": {"jitter": 2}}, "send_retry.jitter", "must be <= 1 (got 2.0)"),
        ({"send_retry": 5}, "send_retry", "expected a mapping (got 5)"),
        ({"send_retry": {"tries": 5}}, "send_retry.tries", "unknown field"),
        (
            {"entity_defaults": {"mailbox_capacity": 0}},
            "entity_defaults.mailbox_capacity",
            "must be >= 1 (got 0)",
        ),
        (
            {"entity_defaults": {"keep_alive": "false"}},
            "entity_defaults.keep_alive",
            "expected true or false (got 'false')",
        ),
        (
            {"entity_defaults": {"defect_retry": {"factor": 0.5}}},
            "entity_defaults.defect_retry.factor",
            "must be >= 1 (got 0.5)",
        ),
        ({"shards": 10}, "shards", "unknown field"),
    ],
)
def test_mapping_errors_name_the_field(data: dict[str, Any], path: str, message: str) -> None:
    error = config_error(ShardingConfig.from_mapping, data)
    assert len(error.fields) == 1
    [(error_path, error_message)] = error.fields
    assert error_path == path
    assert error_message.startswith(message)
    assert str(error).startswith(f"{path}: {message}")
    assert isinstance(error, ValueError)


def test_all_type_errors_and_unknown_keys_are_reported_together() -> None:
    error = config_error(
        ShardingConfig.from_mapping,
        {"shards_per_group": "x", "typo": 1, "entity_defaults": {"concurrency": None, "x": 1}},
    )
    assert [path for path, _ in error.fields] == [
        "shards_per_group",
        "entity_defaults.concurrency",
        "entity_defaults.x",
        "typo",
    ]
    assert str(error).count("; ") == 3


def test_not_a_mapping() -> None:
    error = config_error(ShardingConfig.from_mapping, ["shards_per_group"])
    assert error.fields == [("", "expected a mapping (got ['shards_per_group'])")]
    assert str(error) == "expected a mapping (got ['shards_per_group'])"


def test_entity_options_from_mapping_errors() -> None:
    error = config_error(EntityOptions.from_mapping, {"concurrency": 0, "defect_retry": {}})
    assert error.fields == [("concurrency", "must be >= 1 (got 0)")]


@pytest.mark.parametrize(
    ("environ", "path", "message"),
    [
        (
            {"TRIO_CLUSTER_SHARDS_PER_GROUP": "0"},
            "shards_per_group",
            "must be >= 1 (got 0), set by TRIO_CLUSTER_SHARDS_PER_GROUP",
        ),
        (
            {"TRIO_CLUSTER_SEND_RETRY__MAX_ATTEMPTS": "three"},
            "send_retry.max_attempts",
            "expected an integer (got 'three'), set by TRIO_CLUSTER_SEND_RETRY__MAX_ATTEMPTS",
        ),
        (
            {"TRIO_CLUSTER_ENTITY_DEFAULTS__KEEP_ALIVE": "maybe"},
            "entity_defaults.keep_alive",
            "expected true or false (got 'maybe')",
        ),
        ({"TRIO_CLUSTER_SEND_TIMEOUT": "soon"}, "send_timeout", "expected a number (got 'soon')"),
        ({"TRIO_CLUSTER_SHARD_GROUPS": ""}, "shard_groups", "must name at least one group"),
        ({"TRIO_CLUSTER_SHARD_GROUPS": "a,,b"}, "shard_groups", "'' is not a valid group name"),
        ({"TRIO_CLUSTER_SEND_RETRY": "3"}, "send_retry", "is a section"),
        ({"TRIO_CLUSTER_SHARDS": "3"}, "TRIO_CLUSTER_SHARDS", "unknown setting"),
        (
            {"TRIO_CLUSTER_SEND_RETRY__TRIES": "3"},
            "TRIO_CLUSTER_SEND_RETRY__TRIES",
            "unknown setting",
        ),
        (
            {"TRIO_CLUSTER_SHARDS_PER_GROUP__X": "3"},
            "TRIO_CLUSTER_SHARDS_PER_GROUP__X",
            "unknown setting",
        ),
    ],
)
def test_env_errors_name_the_field(environ: dict[str, str], path: str, message: str) -> None:
    error = config_error(ShardingConfig.from_env, environ)
    [(error_path, error_message)] = error.fields
    assert error_path == path
    assert error_message.startswith(message)


def test_env_reports_every_bad_variable() -> None:
    error = config_error(
        ShardingConfig.from_env,
        {
            "TRIO_CLUSTER_NOPE": "1",
            "TRIO_CLUSTER_SEND_TIMEOUT": "x",
            "TRIO_CLUSTER_SHARDS_PER_GROUP": "0",
        },
    )
    assert [path for path, _ in error.fields] == [
        "TRIO_CLUSTER_NOPE",
        "send_timeout",
        "shards_per_group",
    ]


# --- construction in code --------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "field", "value", "error"),
    [
        (ShardingConfig, "shards_per_group", 0, ValueError),
        (ShardingConfig, "shards_per_group", 1.0, TypeError),
        (ShardingConfig, "shard_groups", (), ValueError),
        (ShardingConfig, "shard_groups", ["default"], TypeError),
        (ShardingConfig, "max_resident_entities", 0, ValueError),
        (ShardingConfig, "send_timeout", 0.0, ValueError),
        (ShardingConfig, "send_timeout", float("inf"), ValueError),
        (ShardingConfig, "entity_termination_timeout", -0.5, ValueError),
        (ShardingConfig, "send_retry", {"max_attempts": 3}, TypeError),
        (ShardingConfig, "entity_defaults", None, TypeError),
        (EntityOptions, "mailbox_capacity", 0, ValueError),
        (EntityOptions, "max_idle_time", 0, ValueError),
        (EntityOptions, "concurrency", 0, ValueError),
        (EntityOptions, "defect_retry", None, TypeError),
        (EntityOptions, "keep_alive", 1, TypeError),
    ],
)
def test_construction_in_code_validates(
    cls: type[Any], field: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match=f"^{field}: "):
        cls(**{field: value})


def test_config_error_pickles() -> None:
    error = ConfigError([("a.b", "must be >= 1 (got 0)"), ("c", "unknown field")])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.fields == error.fields
    assert str(copy) == "a.b: must be >= 1 (got 0); c: unknown field"


# --- transport and lease timing ------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"secret": b""}, ValueError, "secret: must be non-empty"),
        ({"secret": "text"}, TypeError, "secret: must be bytes, not str"),
        ({"ping_interval": 0}, ValueError, "ping_interval: must be > 0"),
        ({"ping_interval": -1.0}, ValueError, "ping_interval"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout: must be > 0"),
        ({"handshake_timeout": 0}, ValueError, "handshake_timeout: must be > 0"),
        ({"port": 70000}, ValueError, "port: must be <= 65535"),
        ({"port": "80"}, TypeError, "port: must be an integer"),
        ({"cluster": ""}, ValueError, "cluster: must not be empty"),
        ({"cluster": "x" * 300}, ValueError, "cluster: must be at most 255"),
        ({"max_frame_size": 100}, ValueError, "max_frame_size: must be >= 4096"),
        ({"max_unsent": 1000}, ValueError, "max_unsent: must be at least max_frame_size"),
        ({"max_handshakes": 0}, ValueError, "max_handshakes: must be >= 1"),
        ({"tls_server": object()}, TypeError, "tls_server: must be an ssl.SSLContext"),
    ],
)
def test_transport_config_is_validated_when_built(
    changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        TransportConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"heartbeat_interval": 0}, "heartbeat_interval: must be > 0"),
        ({"liveness_timeout": -1}, "liveness_timeout"),
        ({"keepalive_count": 0}, "keepalive_count: must be >= 1"),
        ({"idle_session_timeout_ms": 500}, "idle_session_timeout_ms: must exceed"),
    ],
)
def test_lease_timing_is_validated_when_built(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LeaseTiming(**changes)


# --- transport and lease timing: loading ------------------------------------------------


@given(transport_configs)
def test_transport_mapping_and_env_round_trip(config: TransportConfig) -> None:
    assert TransportConfig.from_mapping(config.to_mapping()) == config
    environ = as_environ(config.to_mapping(), TRANSPORT_ENV_PREFIX)
    assert TransportConfig.from_env(environ) == config


@given(lease_timings)
def test_lease_timing_mapping_and_env_round_trip(timing: LeaseTiming) -> None:
    assert LeaseTiming.from_mapping(timing.to_mapping()) == timing
    assert LeaseTiming.from_env(as_environ(timing.to_mapping(), LEASE_ENV_PREFIX)) == timing


def test_transport_and_lease_from_env() -> None:
    environ = {
        "TRIO_CLUSTER_TRANSPORT_HOST": "0.0.0.0",
        "TRIO_CLUSTER_TRANSPORT_PORT": "7000",
        "TRIO_CLUSTER_TRANSPORT_ADVERTISE": "pod-0.runners",
        "TRIO_CLUSTER_TRANSPORT_SECRET": " sésame ",
        "TRIO_CLUSTER_LEASE_HEARTBEAT_INTERVAL": "0.5",
        "TRIO_CLUSTER_LEASE_IDLE_SESSION_TIMEOUT_MS": "0",
        "TRIO_CLUSTER_SHARDS_PER_GROUP": "5",
    }
    transport = TransportConfig.from_env(environ)
    assert (transport.host, transport.port, transport.advertise) == (
        "0.0.0.0",
        7000,
        "pod-0.runners",
    )
    assert transport.secret == " sésame ".encode()  # UTF-8, spaces kept: they are the secret's
    timing = LeaseTiming.from_env(environ)
    assert timing == LeaseTiming(heartbeat_interval=0.5, idle_session_timeout_ms=0)
    # Each loader leaves the other sections' variables alone.
    assert ShardingConfig.from_env(environ) == ShardingConfig(shards_per_group=5)
    assert TransportConfig.from_env({}) == TransportConfig()
    assert LeaseTiming.from_env({"TRIO_CLUSTER_SHARDS_PER_GROUP": "x"}) == LeaseTiming()


def test_other_sections_typos_are_reported_by_their_loader() -> None:
    environ = {"TRIO_CLUSTER_TRANSPORT_PROT": "7000", "TRIO_CLUSTER_LEASE_HEARTBEAT": "1"}
    assert ShardingConfig.from_env(environ) == ShardingConfig()
    assert config_error(TransportConfig.from_env, environ).fields == [
        ("TRIO_CLUSTER_TRANSPORT_PROT", "unknown setting (no such field in TransportConfig)")
    ]
    assert config_error(LeaseTiming.from_env, environ).fields == [
        ("TRIO_CLUSTER_LEASE_HEARTBEAT", "unknown setting (no such field in LeaseTiming)")
    ]


def test_custom_prefix_moves_every_section() -> None:
    environ = {"APP_SHARDS_PER_GROUP": "7", "APP_TRANSPORT_PORT": "1", "APP_LEASE_X": "1"}
    assert ShardingConfig.from_env(environ, prefix="APP_").shards_per_group == 7
    assert TransportConfig.from_env(environ, prefix="APP_TRANSPORT_").port == 1


def test_no_sharding_variable_falls_under_another_section() -> None:
    # Such a field would be skipped by ShardingConfig.from_env and refused by the other.
    for variable in env_variables(ShardingConfig, ENV_PREFIX):
        assert not variable.startswith((TRANSPORT_ENV_PREFIX, LEASE_ENV_PREFIX)), variable


def test_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"\xffbinary key\n")  # the line break `echo` adds is not the secret's
    config = TransportConfig.from_env({"TRIO_CLUSTER_TRANSPORT_SECRET_FILE": str(secret)})
    assert config.secret == b"\xffbinary key"


@pytest.mark.parametrize(
    ("environ", "path", "message"),
    [
        (
            {"TRIO_CLUSTER_TRANSPORT_SECRET": "a", "TRIO_CLUSTER_TRANSPORT_SECRET_FILE": "/x"},
            "secret",
            "set by both TRIO_CLUSTER_TRANSPORT_SECRET and TRIO_CLUSTER_TRANSPORT_SECRET_FILE",
        ),
        (
            {"TRIO_CLUSTER_TRANSPORT_SECRET_FILE": "/nonexistent/secret"},
            "secret",
            "cannot read '/nonexistent/secret' (No such file or directory),"
            " set by TRIO_CLUSTER_TRANSPORT_SECRET_FILE",
        ),
        (
            {"TRIO_CLUSTER_TRANSPORT_SECRET": ""},
            "secret",
            "must be non-empty (or None for no authentication),"
            " set by TRIO_CLUSTER_TRANSPORT_SECRET",
        ),
        ({"TRIO_CLUSTER_TRANSPORT_SECRET": "\udcff"}, "secret", "expected UTF-8 text, set by"),
        (
            {"TRIO_CLUSTER_TRANSPORT_TLS_SERVER": "/etc/cert.pem"},
            "tls_server",
            "cannot be set from the environment, only in code (TRIO_CLUSTER_TRANSPORT_TLS_SERVER)",
        ),
        (
            {"TRIO_CLUSTER_TRANSPORT_MAX_UNSENT": "4096"},
            "max_unsent",
            "must be at least max_frame_size (16777216)",
        ),
        ({"TRIO_CLUSTER_TRANSPORT_PORT": "http"}, "port", "expected an integer (got 'http')"),
        ({"TRIO_CLUSTER_TRANSPORT_ADVERTISE": ""}, "advertise", "must not be empty, set by"),
        (
            {"TRIO_CLUSTER_LEASE_IDLE_SESSION_TIMEOUT_MS": "500"},
            "idle_session_timeout_ms",
            "must exceed heartbeat_interval",
        ),
        ({"TRIO_CLUSTER_LEASE_KEEPALIVE_COUNT": "0"}, "keepalive_count", "must be >= 1 (got 0)"),
    ],
)
def test_transport_and_lease_env_errors(environ: dict[str, str], path: str, message: str) -> None:
    loader = (
        LeaseTiming.from_env if path in attrs.fields_dict(LeaseTiming) else TransportConfig.from_env
    )
    [(error_path, error_message)] = config_error(loader, environ).fields
    assert (error_path, error_message[: len(message)]) == (path, message)


def test_secret_is_never_echoed() -> None:
    error = config_error(TransportConfig.from_mapping, {"secret": "hunter2"})
    assert error.fields == [("secret", "expected bytes (got str)")]


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"secret": 3}, "secret", "expected bytes (got int)"),  # not bytes(3)
        ({"tls_server": "cert.pem"}, "tls_server", "expected an ssl.SSLContext, built in code"),
        ({"port": "80"}, "port", "expected an integer (got '80')"),
        ({"ports": 80}, "ports", "unknown field"),
        ({"advertise": ""}, "advertise", "must not be empty"),
    ],
)
def test_transport_mapping_errors(data: dict[str, Any], path: str, message: str) -> None:
    [(error_path, error_message)] = config_error(TransportConfig.from_mapping, data).fields
    assert (error_path, error_message[: len(message)]) == (path, message)


def test_tls_contexts_pass_through_a_mapping() -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    client = ssl.create_default_context()
    config = TransportConfig.from_mapping({"tls_server": server, "tls_client": client})
    assert (config.tls_server, config.tls_client) == (server, client)
    assert config_error(TransportConfig.from_mapping, {"tls_server": server}).fields == [
        ("", "TLS needs both tls_server and tls_client: a runner accepts and dials")
    ]


# --- the documented variables -----------------------------------------------------------

SECTIONS: list[tuple[type, str]] = [
    (ShardingConfig, ENV_PREFIX),
    (TransportConfig, TRANSPORT_ENV_PREFIX),
    (LeaseTiming, LEASE_ENV_PREFIX),
]
OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def documented_variables() -> dict[str, str]:
    """Variable -> its default cell, from the table under "### Environment variables"."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("\n### Environment variables\n", 1)[1]
    section = re.split(r"^#", section, maxsplit=1, flags=re.MULTILINE)[0]
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", section, re.MULTILINE)
    assert len(rows) == len(dict(rows)), "a variable is listed twice"
    return {name: default.strip().strip("`") for name, default in rows}


def env_text(value: Any) -> str:
    """A default as an operator would write it in the variable, "unset" for None."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_docs_list_exactly_the_accepted_variables_with_their_defaults() -> None:
    expected: dict[str, str] = {}
    for cls, prefix in SECTIONS:
        defaults = cls()
        for variable, path in env_variables(cls, prefix).items():
            expected[variable] = env_text(functools.reduce(getattr, path.split("."), defaults))
    assert documented_variables() == expected
