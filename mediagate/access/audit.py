"""The operators' audit trail as a state-store document (shared by the cluster, the
last ``AUDIT_KEEP`` entries): who changed what and when, from the CLI
(``mediagate.cli.audit``) or the console (``POST /v1/ops/limits``). Entries never hold a
secret: keys appear by their shown prefix only. Pure functions for ``JobStore.mutate``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

AUDIT_ACCOUNT = "_operator"  # not an account: the owner of operator documents
AUDIT_DOCUMENT = "scale_audit"  # its first name (scale changes only), kept for old entries
AUDIT_KEEP = 1000


def audit_entry(by: str, changes: list[str], at: float) -> dict[str, Any]:
    return {"at": at, "by": by, "changes": changes}


def appended(entry: dict[str, Any]) -> Callable[[str | None], tuple[str, None]]:
    def append(current: str | None) -> tuple[str, None]:
        entries = json.loads(current) if current else []
        return json.dumps([*entries, entry][-AUDIT_KEEP:]), None

    return append


def read_entries(current: str | None) -> tuple[str | None, list[dict[str, Any]]]:
    """A change that changes nothing and returns the entries, oldest first."""
    return current, (json.loads(current) if current else [])
