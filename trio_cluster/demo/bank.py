"""The demo's entity: a bank account, with the three kinds of RPC a newcomer asks about.

``deposit`` is persisted and idempotent by transfer id, ``withdraw`` has a
declared error, ``balance`` is a plain volatile read. The balance is the
account's durable state: committed with every deposit's reply, so it
survives the runner that held it being killed.
"""

from __future__ import annotations

import msgspec

from trio_cluster import Entity, EntityContext, EntityOptions, State


class Deposit(msgspec.Struct, frozen=True):
    amount: int
    transfer_id: str


class Withdraw(msgspec.Struct, frozen=True):
    amount: int


class Balance(msgspec.Struct, frozen=True):
    pass


class InsufficientFunds(Exception):
    """Declared: the caller gets it back with its args (needed, available)."""


class AccountState(msgspec.Struct):
    balance: int = 0


Account = Entity("Account")
deposit = Account.rpc("deposit", Deposit, int, persisted=True, primary_key=lambda d: d.transfer_id)
withdraw = Account.rpc("withdraw", Withdraw, int, errors=(InsufficientFunds,))
balance = Account.rpc("balance", Balance, int)


class AccountHandler:
    def __init__(self, ctx: EntityContext, state: State[AccountState]) -> None:
        self.account = state

    @deposit.handler
    async def deposit(self, d: Deposit) -> int:
        self.account.value.balance += d.amount
        return self.account.value.balance

    @withdraw.handler
    async def withdraw(self, w: Withdraw) -> int:
        account = self.account.value
        if w.amount > account.balance:
            raise InsufficientFunds(w.amount, account.balance)
        account.balance -= w.amount
        return account.balance

    @balance.handler
    async def get_balance(self, _: Balance) -> int:
        return self.account.value.balance


ACCOUNTS = Account.implement(
    AccountHandler, EntityOptions(state_save="request"), state=AccountState
)
"""What a runner hosts: withdrawals (volatile) store the balance before they answer."""
