"""The demo's entity: a bank account, with the three kinds of RPC a newcomer asks about.

``deposit`` is persisted and idempotent by transfer id, ``withdraw`` has a
declared error, ``balance`` is a plain volatile read.
"""

from __future__ import annotations

import msgspec

from trio_cluster import Entity, EntityContext


class Deposit(msgspec.Struct, frozen=True):
    amount: int
    transfer_id: str


class Withdraw(msgspec.Struct, frozen=True):
    amount: int


class Balance(msgspec.Struct, frozen=True):
    pass


class InsufficientFunds(Exception):
    """Declared: the caller gets it back with its args (needed, available)."""


Account = Entity("Account")
deposit = Account.rpc("deposit", Deposit, int, persisted=True, primary_key=lambda d: d.transfer_id)
withdraw = Account.rpc("withdraw", Withdraw, int, errors=(InsufficientFunds,))
balance = Account.rpc("balance", Balance, int)


class AccountHandler:
    def __init__(self, ctx: EntityContext) -> None:
        self.balance = 0

    @deposit.handler
    async def deposit(self, d: Deposit) -> int:
        self.balance += d.amount
        return self.balance

    @withdraw.handler
    async def withdraw(self, w: Withdraw) -> int:
        if w.amount > self.balance:
            raise InsufficientFunds(w.amount, self.balance)
        self.balance -= w.amount
        return self.balance

    @balance.handler
    async def get_balance(self, _: Balance) -> int:
        return self.balance
