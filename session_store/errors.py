"""Errors of the session store that the mesh's hierarchy (`managed_agents.mesh.errors`) has no class for yet.

    MeshError
    +-- DataLoss        DATA_LOSS            DATA_LOSS        the database is corrupt; not retryable
    +-- WatchTooSlow    RESOURCE_EXHAUSTED   WATCH_TOO_SLOW   metadata: after_seq (the resume cursor)

Importing this module registers them, so `managed_agents.mesh.status.from_rpc_error` rebuilds them by reason on
the client side (`session_store.client` imports it).
"""

from __future__ import annotations

from managed_agents.mesh.errors import Code, MeshError

RESUME_KEY = "after_seq"
"""`ErrorInfo.metadata` key of the sequence number a watch ended after: resume with `after_seq` set to it."""


class DataLoss(MeshError):
    """The store's database is corrupt, so what it would answer cannot be trusted. Retrying does not help; an
    operator must restore the database (the message says how)."""

    code = Code.DATA_LOSS
    reason = "DATA_LOSS"


class WatchTooSlow(MeshError):
    """A watcher fell too far behind the live events of its session and its stream was ended; nothing is lost:
    watching again with `after_seq` = `metadata['after_seq']` continues exactly after the last event delivered.

    RESOURCE_EXHAUSTED, because the watcher used up its share of the server's memory (a per-watcher quota), and
    not UNAVAILABLE (the server is fine, and a client that resumes at the same pace will be ended again) nor
    ABORTED (which this mesh uses for `SEQUENCE_MISMATCH`, a conflicting write)."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "WATCH_TOO_SLOW"

    @property
    def after_seq(self) -> int:
        """The sequence number of the last event the stream delivered."""
        return int(self.metadata.get(RESUME_KEY, "0"))


def resume_cursor(error: MeshError) -> int | None:
    """The `after_seq` to resume a watch ended by `error` from, if the error carries one."""
    value = error.metadata.get(RESUME_KEY)
    return int(value) if value is not None and value.isdigit() else None
