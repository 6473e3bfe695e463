"""Accounts and keys: one contract, both backends (SQLite, a real redis-server)."""

from __future__ import annotations

import pytest

from mediagate.access.accounts import AccountStore, open_account_store
from mediagate.stores import StateConfig
from tests.fakes import FakeClock


@pytest.fixture
def accounts(state_config: StateConfig) -> AccountStore:
    return open_account_store(state_config, clock=FakeClock(1_800_000_000.0))


async def test_accounts_keys_and_authentication(accounts: AccountStore) -> None:
    alice = accounts.ensure_account("alice", "plus")
    assert accounts.ensure_account("alice", "pro") == alice  # exists: unchanged
    assert alice.created_at == 1_800_000_000.0 and alice.tier == "plus"
    key = accounts.create_key(alice.id)
    assert key.startswith("mg-")
    assert await accounts.authenticate(key) == alice
    assert await accounts.authenticate(key + "x") is None
    assert await accounts.authenticate("sk-not-ours") is None

    moved = accounts.set_tier("alice", "pro")
    assert moved is not None and moved.tier == "pro"
    assert (await accounts.authenticate(key)) == moved
    assert accounts.set_tier("nobody", "pro") is None

    [info] = accounts.list_keys()
    assert (info.account, info.tier, info.revoked) == ("alice", "pro", False)
    assert accounts.revoke(info.prefix)
    assert not accounts.revoke(info.prefix)  # already revoked
    assert await accounts.authenticate(key) is None
    assert accounts.list_keys()[0].revoked


def test_backdated_accounts(accounts: AccountStore) -> None:
    old = accounts.ensure_account("imported", "plus", created_at=1_800_000_000.0 - 8 * 86400)
    assert old.created_at == 1_800_000_000.0 - 8 * 86400
    assert accounts.get_account("imported") == old
    assert accounts.get_account("missing") is None


async def test_a_key_carries_its_role_and_accounts_keep_theirs_per_key(
    accounts: AccountStore,
) -> None:
    ops = accounts.ensure_account("ops", "pro")
    operator_key = accounts.create_key(ops.id, role="operator")
    user_key = accounts.create_key(ops.id)  # the same account, a plain key
    by_operator, by_user = (
        await accounts.authenticate(operator_key),
        await accounts.authenticate(user_key),
    )
    assert by_operator is not None and by_operator.role == "operator"
    assert by_user is not None and by_user.role == "user" and by_user.id == by_operator.id
    assert sorted(info.role for info in accounts.list_keys()) == ["operator", "user"]
    with pytest.raises(ValueError, match="unknown role"):
        accounts.create_key(ops.id, role="admin")
    assert len(accounts.list_keys()) == 2  # the refused key was not made
    accounts.revoke(operator_key[:11])
    assert await accounts.authenticate(operator_key) is None
