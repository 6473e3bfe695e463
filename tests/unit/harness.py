"""The router app in-process (FastAPI TestClient) with fake scheduler handles and real stores."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from deployments.router.gateway import Gateway
from deployments.router.routes import create_api
from deployments.router.settings import RouterSettings
from mediagate.access.accounts import AccountStore, SqliteAccountStore
from mediagate.access.guard import TierGuard
from mediagate.access.ledger import QuotaLedger
from mediagate.access.tiers import TierPolicy, load_tier_policy
from mediagate.moderation.moderator import Moderator
from mediagate.protocol.catalog import Catalog
from mediagate.provenance.signing import ContentSigner
from mediagate.stores import JobStore
from mediagate.stores.artifacts import LocalArtifactStore
from mediagate.stores.sqlite_store import SqliteStateStore
from mediagate.webhooks.settings import WebhookSettings
from models.catalog import load_catalog
from tests.fakes import FakeClock, FakeScheduler, FakeVideoScheduler, LocalHandle

URL = "/v1/images/generations"


class Service:
    def __init__(
        self,
        tmp_path: Path,
        *,
        catalog: Catalog | None = None,
        policy: TierPolicy | None = None,
        tier: str = "pro",
        jobs: JobStore | None = None,
        accounts: AccountStore | None = None,
        webhooks: WebhookSettings | None = None,
        signer: ContentSigner | None = None,
        moderator: Moderator | None = None,
        **settings: Any,
    ) -> None:
        self.clock = FakeClock()
        # Account ages are read on the router's clock, so accounts are born on it too.
        self.accounts = accounts or SqliteAccountStore(tmp_path / "state.db", clock=self.clock)
        account = self.accounts.ensure_account("alice", tier)
        self.key = self.accounts.create_key(account.id)
        self.scheduler = FakeScheduler()
        self.video_scheduler = FakeVideoScheduler()
        self.artifacts = LocalArtifactStore(tmp_path / "artifacts", b"k" * 32, clock=self.clock)
        self.jobs = jobs or SqliteStateStore(tmp_path / "state.db")
        self.gateway = gateway = Gateway(
            catalog=catalog or load_catalog(),
            schedulers={
                "tiny-sd": LocalHandle(self.scheduler),
                "tiny-wan": LocalHandle(self.video_scheduler),
            },
            accounts=self.accounts,
            artifacts=self.artifacts,
            jobs=self.jobs,
            settings=RouterSettings(**settings),
            guard=TierGuard(QuotaLedger(self.jobs, policy or load_tier_policy(), clock=self.clock)),
            webhook_settings=webhooks,
            signer=signer,
            moderator=moderator,
            clock=self.clock,
        )
        self.client = TestClient(create_api(gateway), raise_server_exceptions=False)
        # One event loop for the client's life, as a server has: without it each request
        # runs on a loop of its own that ends with the response, killing the bookkeeping a
        # request leaves detached (a stream's settlement) when the machine is slow.
        self.client.__enter__()
        weakref.finalize(self, self.client.__exit__, None, None, None)
        self.auth = {"Authorization": f"Bearer {self.key}"}

    def generate(self, body: Any, **kwargs: Any) -> Any:
        return self.client.post(URL, json=body, headers=self.auth, **kwargs)

    def other_auth(
        self, name: str = "mallory", tier: str = "pro", *, age_days: float | None = None
    ) -> dict[str, str]:
        """Auth headers of another account (of ``tier``, ``age_days`` old if given)."""
        created_at = None if age_days is None else self.clock() - age_days * 86400
        account = self.accounts.ensure_account(name, tier, created_at=created_at)
        return {"Authorization": f"Bearer {self.accounts.create_key(account.id)}"}
