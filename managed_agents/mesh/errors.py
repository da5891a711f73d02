"""The one error hierarchy of the mesh, free of gRPC so that service cores can raise it.

    MeshError                      code                 reason
    +-- InvalidArgument            INVALID_ARGUMENT     INVALID_ARGUMENT (with field violations)
    |   +-- UndecodableRequest     INVALID_ARGUMENT     INVALID_ARGUMENT (the bytes are not the request message)
    +-- NotFound
    |   +-- SessionNotFound        NOT_FOUND            SESSION_NOT_FOUND
    |   +-- SandboxNotFound        NOT_FOUND            SANDBOX_NOT_FOUND
    |   +-- CredentialNotFound     NOT_FOUND            CREDENTIAL_NOT_FOUND
    +-- SessionAlreadyExists       ALREADY_EXISTS       SESSION_ALREADY_EXISTS
    +-- SequenceMismatch           ABORTED              SEQUENCE_MISMATCH (metadata: last_seq)
    +-- LeaseFenced                FAILED_PRECONDITION  LEASE_FENCED
    +-- LeaseHeld                  FAILED_PRECONDITION  LEASE_HELD (metadata: holder, epoch, expire_time)
    +-- IdempotencyKeyReused       FAILED_PRECONDITION  IDEMPOTENCY_KEY_REUSED
    +-- SandboxLost                FAILED_PRECONDITION  SANDBOX_LOST
    +-- FailedPrecondition         FAILED_PRECONDITION  FAILED_PRECONDITION
    |   +-- LabelsNotCarried       FAILED_PRECONDITION  LABELS_NOT_CARRIED
    +-- SandboxUnavailable         UNAVAILABLE          SANDBOX_UNAVAILABLE
    +-- TokenInvalid               UNAUTHENTICATED      TOKEN_INVALID
    +-- NotMeshPeer                UNAUTHENTICATED      NOT_MESH_PEER
    +-- NotGranted                 PERMISSION_DENIED    NOT_GRANTED
    +-- Unavailable                UNAVAILABLE          DEPENDENCY_UNAVAILABLE   (retryable)
    |   +-- ShuttingDown           UNAVAILABLE          SHUTTING_DOWN            (retryable)
    +-- DeadlineExceeded           DEADLINE_EXCEEDED    -
    +-- Internal                   INTERNAL             INTERNAL

Reasons are the `managed_agents.v1.ErrorReason` names without their prefix; `managed_agents.mesh.status`
turns these errors into `google.rpc.Status` on servers and back into these classes on clients.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class Code(enum.IntEnum):
    """gRPC status codes, by their standard numbers (kept here so cores need not import grpc)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One malformed field of a request: its path (e.g. `event.user_message.content`) and what is wrong."""

    field: str
    description: str


class MeshError(Exception):
    """Base of every error a mesh service returns or a mesh client raises."""

    code: Code = Code.UNKNOWN
    reason: str = ""
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: tuple[FieldViolation, ...] = tuple(violations)
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class InvalidArgument(MeshError):
    """The request is malformed; `violations` names the fields."""

    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """An error about one field, whose message reads `field: description`."""
        return cls(f"{field}: {description}", violations=[FieldViolation(field, description)])


class UndecodableRequest(InvalidArgument):
    """The bytes a client sent are not an encoding of the RPC's request message (corrupt or truncated
    protobuf, invalid UTF-8 in a string field, messages nested deeper than protobuf decodes): the server did
    not process them. Servers raise none themselves: `managed_agents.mesh.decoding` answers with it."""


class NotFound(MeshError):
    """The named resource does not exist."""

    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class SessionNotFound(NotFound):
    """No session has this id."""

    reason = "SESSION_NOT_FOUND"


class SandboxNotFound(NotFound):
    """No sandbox has this id on this hands server."""

    reason = "SANDBOX_NOT_FOUND"


class CredentialNotFound(NotFound):
    """No credential has this name."""

    reason = "CREDENTIAL_NOT_FOUND"


class SessionAlreadyExists(MeshError):
    """A session with the requested id exists."""

    code = Code.ALREADY_EXISTS
    reason = "SESSION_ALREADY_EXISTS"


class SequenceMismatch(MeshError):
    """`expected_seq` did not match; `metadata['last_seq']` holds the log's last sequence number."""

    code = Code.ABORTED
    reason = "SEQUENCE_MISMATCH"

    @property
    def last_seq(self) -> int:
        """The log's last sequence number when the append was refused."""
        return int(self.metadata.get("last_seq", "0"))


class FailedPrecondition(MeshError):
    """The server is not set up for the request: a feature it was not configured for, or that its backend
    cannot do."""

    code = Code.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class LabelsNotCarried(FailedPrecondition):
    """The hands server does not carry the placement labels the sandbox asks for."""

    reason = "LABELS_NOT_CARRIED"


class LeaseFenced(MeshError):
    """The writer's lease epoch is no longer current: another holder owns the session now."""

    code = Code.FAILED_PRECONDITION
    reason = "LEASE_FENCED"


class LeaseHeld(MeshError):
    """Another holder has an unexpired lease on the session."""

    code = Code.FAILED_PRECONDITION
    reason = "LEASE_HELD"


class IdempotencyKeyReused(MeshError):
    """An idempotency key was sent again with a different request."""

    code = Code.FAILED_PRECONDITION
    reason = "IDEMPOTENCY_KEY_REUSED"


class SandboxLost(MeshError):
    """The sandbox died; a new one must be provisioned."""

    code = Code.FAILED_PRECONDITION
    reason = "SANDBOX_LOST"


class SandboxUnavailable(MeshError):
    """The sandbox backend cannot provision now."""

    code = Code.UNAVAILABLE
    reason = "SANDBOX_UNAVAILABLE"
    retryable = True


class TokenInvalid(MeshError):
    """A session token is missing, malformed, expired or revoked."""

    code = Code.UNAUTHENTICATED
    reason = "TOKEN_INVALID"


class NotMeshPeer(MeshError):
    """The caller did not present this mesh's secret (`managed_agents.mesh.auth`)."""

    code = Code.UNAUTHENTICATED
    reason = "NOT_MESH_PEER"


class NotGranted(MeshError):
    """The session token does not grant what the call asks for."""

    code = Code.PERMISSION_DENIED
    reason = "NOT_GRANTED"


class Unavailable(MeshError):
    """A server or its dependency cannot be reached now; retrying later may work."""

    code = Code.UNAVAILABLE
    reason = "DEPENDENCY_UNAVAILABLE"
    retryable = True


class ShuttingDown(Unavailable):
    """The server is shutting down."""

    reason = "SHUTTING_DOWN"


class DeadlineExceeded(MeshError):
    """The call did not finish within its deadline."""

    code = Code.DEADLINE_EXCEEDED
    reason = ""
    retryable = True


class Internal(MeshError):
    """An unexpected failure inside a server; its log has the details."""

    code = Code.INTERNAL
    reason = "INTERNAL"


def _leaves(cls: type[MeshError]) -> list[type[MeshError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_leaves(sub))
    return found


def error_class(reason: str, code: Code) -> type[MeshError]:
    """The most specific class for a reason received on the wire, falling back to the code's class."""
    for cls in _leaves(MeshError):
        if reason and cls.reason == reason:
            return cls
    for cls in (InvalidArgument, NotFound, Unavailable, DeadlineExceeded, Internal, FailedPrecondition):
        if cls.code == code:
            return cls
    return MeshError
