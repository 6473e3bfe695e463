"""`mediagate webhooks add/list/remove`: an account's webhook endpoints, on the same store
as the service (the same checks as `POST /v1/webhooks`; the secret is printed once)."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mediagate.access.accounts import Account, open_account_store
from mediagate.cli.audit import record
from mediagate.cli.command import CommandError, _state
from mediagate.protocol.errors import MediagateError
from mediagate.protocol.webhooks import WebhookEndpointCreate
from mediagate.settings import get_settings
from mediagate.stores import open_state_store
from mediagate.webhooks.endpoints import WebhookEndpoints
from mediagate.webhooks.settings import WebhookSettings

T = TypeVar("T")


def _account(name: str) -> Account:
    account = open_account_store(_state()).get_account(name)
    if account is None:
        raise CommandError(f"no account called {name!r}")
    return account


def _with_endpoints(work: Callable[[WebhookEndpoints], Awaitable[T]]) -> T:
    settings = WebhookSettings(allowed_networks=get_settings().webhook_networks)

    async def run() -> T:
        store = open_state_store(_state())
        try:
            return await work(WebhookEndpoints(store, settings))
        finally:
            await store.close()

    return asyncio.run(run())


def command_webhooks_add(args: argparse.Namespace) -> int:
    account = _account(args.account)
    try:
        chosen = {"events": args.events} if args.events else {}
        wanted = WebhookEndpointCreate.model_validate({"url": args.url, **chosen})
    except ValueError as error:
        raise CommandError(str(error)) from None
    try:
        created = _with_endpoints(lambda endpoints: endpoints.add(account.id, wanted))
    except MediagateError as error:
        raise CommandError(error.message) from None
    record([f"account {account.name}: webhook {created.id} added ({', '.join(created.events)})"])
    print(f"webhook {created.id} for account {account.name}: {', '.join(created.events)}")
    print("its signing secret is shown once:")
    print(created.secret)
    return 0


def command_webhooks_list(args: argparse.Namespace) -> int:
    account = _account(args.account)
    endpoints = _with_endpoints(lambda e: e.list(account.id))
    print(f"{'ID':<28} {'STATUS':<9} {'CREATED (UTC)':<20} {'EVENTS':<32} URL")
    for endpoint in endpoints:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(endpoint.created_at))
        print(
            f"{endpoint.id:<28} {endpoint.status:<9} {created:<20} "
            f"{','.join(endpoint.events):<32} {endpoint.url}"
        )
        if endpoint.disabled_reason:
            print(f"{'':<28} disabled: {endpoint.disabled_reason}")
    return 0


def command_webhooks_remove(args: argparse.Namespace) -> int:
    account = _account(args.account)
    if not _with_endpoints(lambda e: e.remove(account.id, args.id)):
        raise CommandError(f"account {account.name} has no webhook {args.id!r}")
    record([f"account {account.name}: webhook {args.id} removed"])
    print(f"removed webhook {args.id}")
    return 0
