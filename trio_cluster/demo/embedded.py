"""The bank on one runner and the in-memory storage: the demo without PostgreSQL.

It shows the three things a newcomer asks about first: entities keep
state, a declared error comes back as itself, and a retried transfer
with the same id is answered from the stored reply instead of running twice.
"""

from __future__ import annotations

import statistics
import time

import trio

from trio_cluster import open_runner

from .bank import (
    ACCOUNTS,
    Balance,
    Deposit,
    InsufficientFunds,
    Withdraw,
    balance,
    deposit,
    withdraw,
)


async def main(accounts: int = 100, deposits_each: int = 50) -> None:
    async with open_runner(ACCOUNTS) as runner:
        print(f"runner {runner.address}: {len(runner.shards)} shards, in-memory storage")

        print(await runner.ask(deposit, "alice", Deposit(100, "t-1")), "<- alice after t-1")
        print(await runner.ask(deposit, "alice", Deposit(100, "t-1")), "<- t-1 again: not re-run")
        try:
            await runner.ask(withdraw, "alice", Withdraw(500))
        except InsufficientFunds as refused:
            print(f"withdraw 500 refused: InsufficientFunds{refused.args}")

        latencies: list[float] = []

        async def customer(n: int) -> None:
            for i in range(deposits_each):
                start = time.perf_counter()
                await runner.ask(deposit, f"acct-{n}", Deposit(1, f"{n}-{i}"))
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for n in range(accounts):
                nursery.start_soon(customer, n)
        elapsed = time.perf_counter() - start
        total = accounts * deposits_each
        cuts = statistics.quantiles(latencies, n=100)
        print(
            f"{total} persisted deposits from {accounts} concurrent customers in "
            f"{elapsed:.2f} s: {total / elapsed:,.0f}/s, "
            f"p50 {cuts[49] * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms"
        )
        balances = [await runner.ask(balance, f"acct-{n}", Balance()) for n in range(accounts)]
        assert balances == [deposits_each] * accounts, "a deposit was lost or doubled"
        print(f"every account holds exactly {deposits_each}: {runner.snapshot()}")


if __name__ == "__main__":
    trio.run(main)
