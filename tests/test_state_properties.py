"""Durable state under any interleaving: each acknowledged change applied exactly once.

Hypothesis chooses a schedule of persisted credits (some keys sent twice),
lost leases (a crash of the lock connection, as far as the shard can tell),
passivations, and volatile reads, each after a few yields, all at once. At
the end, whatever was acknowledged must be in the stored state exactly
once, and the state must be the sequential fold of the acknowledged
credits: nothing applied twice, nothing half-applied, nothing lost.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import ClassVar

import attrs
import msgspec
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_cluster import (
    ClusterError,
    Entity,
    EntityContext,
    EntityOptions,
    MemoryStorage,
    PersistenceError,
    State,
    open_runner,
)
from trio_cluster.testing import TEST_CONFIG

CONFIG = attrs.evolve(TEST_CONFIG, shards_per_group=2, max_resident_entities=2)
WALLETS = ("w0", "w1", "w2")


class Credit(msgspec.Struct, frozen=True):
    key: str
    amount: int


class Balance(msgspec.Struct, frozen=True):
    pass


class WalletState(msgspec.Struct):
    balance: int = 0
    applied: list[str] = []


Wallet = Entity("Wallet")
credit = Wallet.rpc("credit", Credit, int, persisted=True, primary_key=lambda c: c.key)
balance = Wallet.rpc("balance", Balance, int)


class WalletHandler:
    yields: ClassVar[int] = 0

    def __init__(self, ctx: EntityContext, state: State[WalletState]) -> None:
        self.state = state

    @credit.handler
    async def credit(self, c: Credit) -> int:
        # The change is made in two steps, with yields between: a crash can
        # land in the middle, and must never leave half of it.
        self.state.value.balance += c.amount
        for _ in range(self.yields):
            await trio.lowlevel.checkpoint()
        self.state.value.applied.append(c.key)
        return self.state.value.balance

    @balance.handler
    async def get_balance(self, _: Balance) -> int:
        return self.state.value.balance


operations = st.lists(
    st.tuples(
        st.sampled_from(["credit", "credit again", "lose", "outage", "passivate", "read"]),
        st.sampled_from(WALLETS),
        st.integers(1, 9),
        st.integers(0, 6),
    ),
    min_size=1,
    max_size=25,
)


@given(
    operations=operations, yields=st.integers(0, 3), mode=st.sampled_from(["interval", "request"])
)
def test_each_acknowledged_credit_is_applied_exactly_once(
    operations: list[tuple[str, str, int, int]], yields: int, mode: str
) -> None:
    handler = type("Yielding", (WalletHandler,), {"yields": yields})
    options = EntityOptions(state_save=mode)  # type: ignore[arg-type]
    implementation = Wallet.implement(handler, options, state=WalletState)
    storage = MemoryStorage()
    acknowledged: dict[str, tuple[str, int]] = {}

    async def main() -> None:
        async with open_runner(implementation, storage=storage, config=CONFIG) as runner:
            planned: dict[str, tuple[str, int]] = {}

            async def one(kind: str, wallet: str, amount: int, delay: int, number: int) -> None:
                for _ in range(delay):
                    await trio.lowlevel.checkpoint()
                if kind in ("credit", "credit again"):
                    if kind == "credit again" and planned:
                        # The same request again: same key, same wallet, same amount.
                        key = list(planned)[-1]
                    else:
                        key = f"{wallet}-{number}"
                        planned[key] = (wallet, amount)
                    wallet, amount = planned[key]
                    try:
                        await runner.ask(credit, wallet, Credit(key, amount))
                    except PersistenceError:
                        # Refused before storing (MemoryStorage fails before it writes):
                        # not acknowledged, so it must not be applied either.
                        return
                    acknowledged[key] = (wallet, amount)
                elif kind == "lose":
                    storage.revoke(Wallet.shard_of(wallet, CONFIG.shards_per_group))
                elif kind == "outage":
                    # Long enough (mock time) for a reply's store to give up, sometimes.
                    storage.available = False
                    await trio.sleep(amount / 4)
                    storage.available = True
                elif kind == "passivate":
                    for shard in list(runner._shards.values()):
                        for entity in list(shard.entities.values()):
                            if entity.idle:
                                entity.passivate()
                else:
                    # Volatile: at most once, so a lost lease or an outage may fail it.
                    with contextlib.suppress(ClusterError):
                        await runner.ask(balance, wallet, Balance())

            async with trio.open_nursery() as nursery:
                for number, operation in enumerate(operations):
                    nursery.start_soon(one, *operation, number)
        # Leaving the runner drained and stored everything.

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    async def check() -> None:
        for wallet in WALLETS:
            data = await storage.load_state("Wallet", wallet)
            state = (
                WalletState() if data is None else msgspec.msgpack.decode(data, type=WalletState)
            )
            mine = {key: amount for key, (owner, amount) in acknowledged.items() if owner == wallet}
            # Every acknowledged key once, none twice, none unacknowledged.
            assert Counter(state.applied) == Counter(mine.keys()), (wallet, state.applied, mine)
            assert state.balance == sum(mine.values())

    trio.run(check)
