"""Long-lived SQLite connections, one per thread, shared by the SQLite stores.

Opening a connection per call was the router's main cost under load: in WAL mode
the last connection to close checkpoints the log and deletes it, so every call
paid an open, a checkpoint and an fsync, partly on the event loop. A connection
per thread stays open for the life of the store instead; each call still runs
its own statement or transaction, so several processes can share the file.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mediagate.protocol.errors import StoreUnavailable

logger = logging.getLogger(__name__)

# What the disk or the file's state did, not what the caller asked: a 503 the client may
# retry (the disk full, an I/O error, the file gone read-only or unopenable, a lock held
# past the busy timeout), never a 500.
UNAVAILABLE_ERRORS = (
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_NOMEM",
)


class SqliteConnections:
    """Hands each thread its own open connection to ``path`` (autocommit mode)."""

    def __init__(self, path: Path, *pragmas: str) -> None:
        self.path = path
        self._pragmas = ("PRAGMA journal_mode=WAL", *pragmas)
        self._local = threading.local()

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=True
            )
            for pragma in self._pragmas:
                db.execute(pragma)
            # Accounts, key hashes and the ledger are the owner's alone. chmod, never an
            # open and close of the file: closing any descriptor of it drops every POSIX
            # lock this process holds on it, and SQLite then fails ("disk I/O error").
            for path in (self.path, *(Path(f"{self.path}{end}") for end in ("-wal", "-shm"))):
                with contextlib.suppress(FileNotFoundError):
                    path.chmod(0o600)
        except (sqlite3.Error, OSError) as error:
            logger.warning("cannot open %s: %r", self.path, error)  # operators see the path
            raise StoreUnavailable(
                "the state store cannot be opened; please retry shortly"
            ) from error
        return db

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection; a transaction left open by an error is rolled back,
        and a connection that failed is dropped so the next call opens a fresh one."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open()
        try:
            yield db
        except sqlite3.Error as error:
            self._local.db = None
            db.close()
            if getattr(error, "sqlite_errorname", "").startswith(UNAVAILABLE_ERRORS):
                logger.warning("%s cannot be used: %r", self.path, error)
                raise StoreUnavailable(
                    "the state store cannot write right now; please retry shortly",
                    retry_after_s=5.0,
                ) from error
            raise
        finally:
            if self._local.db is db and db.in_transaction:
                db.rollback()
