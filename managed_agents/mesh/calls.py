"""Client-side helper: run a gRPC call and raise the typed `MeshError` instead of `grpc.aio.AioRpcError`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from managed_agents.mesh.status import from_rpc_error


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Re-raises gRPC errors raised inside the block as `MeshError` subclasses."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from None
