"""Runners that must prove themselves to each other: shared secrets and TLS."""

from __future__ import annotations

import ssl

import attrs
import pytest
import trio
import trustme

from trio_cluster import MemoryStorage, RunnerUnavailable, TransportConfig, open_runner
from trio_cluster.testing import TEST_CONFIG, open_test_cluster

from .entities import Add, add, counter


def tls(ca: trustme.CA) -> TransportConfig:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return TransportConfig(tls_server=server, tls_client=client, secret=b"s3cret")


async def test_runners_talk_over_tls() -> None:
    impl, _ = counter()
    async with open_test_cluster(impl, runners=2, transport=tls(trustme.CA())) as cluster:
        first = cluster.runners[0]
        remote = next(
            f"e{n}" for n in range(100) if cluster.owner_of(impl.entity, f"e{n}") is not first
        )
        assert await first.ask(add, remote, Add(3)) == 3


@pytest.mark.parametrize("mismatch", ["untrusted certificate", "other secret"])
async def test_a_runner_that_cannot_prove_itself_is_refused(mismatch: str) -> None:
    impl, _ = counter()
    good = tls(trustme.CA())
    if mismatch == "untrusted certificate":
        bad = attrs.evolve(good, tls_client=tls(trustme.CA()).tls_client)
    else:
        bad = attrs.evolve(good, secret=b"guess")
    storage = MemoryStorage()
    config = attrs.evolve(TEST_CONFIG, shards_per_group=4)
    async with (
        open_test_cluster(
            impl, runners=1, storage=storage, config=config, transport=good
        ) as cluster,
        # An intruder hosting nothing, so every request must go to the cluster's runner.
        open_runner(storage=storage, config=config, transport=bad) as intruder,
    ):
        with trio.fail_after(5), pytest.raises(RunnerUnavailable):
            await intruder.ask(add, "e1", Add(1))
        # The runner it tried to reach goes on serving everyone else.
        assert await cluster.runners[0].ask(add, "e1", Add(1)) == 1


def mutual_tls(ca: trustme.CA, host: str) -> TransportConfig:
    """TLS both ways: every runner presents a certificate for ``host``, and demands one."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    certificate = ca.issue_cert(host)
    certificate.configure_cert(server)
    certificate.configure_cert(client)
    return TransportConfig(tls_server=server, tls_client=client, secret=b"s3cret")


async def test_mutual_tls_proves_each_runners_address(caplog: pytest.LogCaptureFixture) -> None:
    impl, _ = counter()
    ca = trustme.CA()
    good = mutual_tls(ca, "127.0.0.1")
    assert good.mutual_tls
    storage = MemoryStorage()
    config = attrs.evolve(TEST_CONFIG, shards_per_group=4)
    async with (
        open_test_cluster(
            impl, runners=2, storage=storage, config=config, transport=good
        ) as cluster,
        # A member of the cluster's CA, with the secret, but a certificate for
        # another host than the address it claims (127.0.0.1:port).
        open_runner(
            storage=storage, config=config, transport=mutual_tls(ca, "intruder.example")
        ) as intruder,
    ):
        with trio.fail_after(5), pytest.raises(RunnerUnavailable):
            await intruder.ask(add, "e1", Add(1))
        assert "but its certificate names ['intruder.example']" in caplog.text
        first = cluster.runners[0]
        remote = next(
            f"e{n}" for n in range(100) if cluster.owner_of(impl.entity, f"e{n}") is not first
        )
        assert await first.ask(add, remote, Add(2)) == 2
