"""`mediagate keys`, `accounts` and `usage`: the operator's account commands, on the same
store as the service.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from mediagate.access.accounts import PREFIX_LENGTH, AccountStore, open_account_store
from mediagate.access.guard import go_duration
from mediagate.access.ledger import QuotaLedger
from mediagate.access.quota import Usage
from mediagate.access.tiers import TierPolicy, load_tier_policy
from mediagate.cli.audit import record
from mediagate.cli.command import CommandError, _state
from mediagate.settings import get_settings
from mediagate.stores import open_state_store


def _accounts() -> AccountStore:
    return open_account_store(_state())


def _policy() -> TierPolicy:
    return load_tier_policy(get_settings().tiers_file)


def _tier(name: str) -> str:
    policy = _policy()
    if name not in policy.tiers:
        raise CommandError(f"unknown tier {name!r}; the tier file has {', '.join(policy.tiers)}")
    return name


def command_keys_create(args: argparse.Namespace) -> int:
    store = _accounts()
    tier = _tier(args.tier)
    name = args.account or f"account-{int(time.time())}"
    created_at = None
    if args.created_days_ago is not None:
        created_at = time.time() - args.created_days_ago * 86400
    account = store.ensure_account(name, tier, created_at=created_at)
    if account.tier != tier:
        print(f"note: account {name} exists with tier {account.tier}; kept", file=sys.stderr)
    key = store.create_key(account.id, role=args.role)
    record(
        [
            f"created key {key[:PREFIX_LENGTH]}... for account {account.name} "
            f"({account.tier}, role {args.role})"
        ]
    )
    print(
        f"created a key for account {account.name} (tier {account.tier}, role {args.role}); "
        "it is shown once:"
    )
    print(key)
    return 0


def command_accounts_set_tier(args: argparse.Namespace) -> int:
    store = _accounts()
    before = store.get_account(args.name)
    account = store.set_tier(args.name, _tier(args.tier))
    if account is None or before is None:
        raise CommandError(f"no account called {args.name!r}")
    record([f"account {account.name}: tier {before.tier} -> {account.tier}"])
    print(f"account {account.name} is now on tier {account.tier}")
    return 0


def command_usage(args: argparse.Namespace) -> int:
    account = _accounts().get_account(args.name)
    if account is None:
        raise CommandError(f"no account called {args.name!r}")
    policy = _policy()

    async def read() -> Usage:
        store = open_state_store(_state())
        try:
            return await QuotaLedger(store, policy).usage(account)
        finally:
            await store.close()

    usage = asyncio.run(read())
    age_days = (time.time() - account.created_at) / 86400

    def limit(value: int | None) -> str:
        return "unlimited" if value is None else str(value)

    print(f"account {account.name}: tier {account.tier}, {age_days:.1f} days old")
    print(
        f"quota day {usage.day} ({policy.timezone}), resets in {go_duration(usage.day_resets_in_s)}"
    )
    print(f"{'LIMIT':<22} {'USED':>6} {'OF':>10}")
    print(f"{'images today':<22} {usage.images_today:>6} {limit(usage.images_per_day):>10}")
    if usage.images_per_minute is not None:  # counted only where the tier limits it
        used, of = usage.images_last_minute, usage.images_per_minute
        print(f"{'images last minute':<22} {used:>6} {of:>10}")
    tier = policy.tier(account.tier)
    if tier.cooldown is not None:
        print(f"{'images this burst':<22} {usage.burst_images:>6} {tier.cooldown.after_images:>10}")
        if usage.cooldown_left_s:
            print(f"cooling down for another {go_duration(usage.cooldown_left_s)}")
    print(f"{'video jobs running':<22} {usage.video_jobs_active:>6} {usage.video_jobs_at_once:>10}")
    return 0


def command_keys_list(_: argparse.Namespace) -> int:
    print(f"{'PREFIX':<13} {'ACCOUNT':<24} {'TIER':<8} {'ROLE':<9} {'CREATED (UTC)':<20} STATE")
    for info in _accounts().list_keys():
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.created_at))
        state = "revoked" if info.revoked else "active"
        print(
            f"{info.prefix:<13} {info.account:<24} {info.tier:<8} {info.role:<9} "
            f"{created:<20} {state}"
        )
    return 0


def command_keys_revoke(args: argparse.Namespace) -> int:
    if not _accounts().revoke(args.prefix):
        raise CommandError(f"no active key starts with {args.prefix}")
    record([f"revoked key {args.prefix[:PREFIX_LENGTH]}..."])
    print(f"revoked {args.prefix}")
    return 0
