"""Mutual TLS between mesh peers: every server asks for a client certificate signed by the mesh's CA, and every
client checks the server's certificate against the same CA.

Opt-in: set `MANAGED_AGENTS_TLS_DIR` to a directory holding `ca.crt`, `mesh.crt` and `mesh.key` (made for a dev
mesh by `managed-agents certs DIR`; in production, issued by the platform's CA). Every service and the CLI read
the same variable. Peers are named by one identity, `MESH_NAME`, carried in the certificate's subjectAltName and
checked by clients whatever address they dial: a mesh reached through load balancers, several store replicas
(`ipv4:a,b`) or changing pod addresses needs no per-address certificates. TLS and the mesh secret
(`managed_agents.mesh.auth`) can be on together; a sandbox has neither (hands give it none of the mesh's files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from managed_agents.mesh import pki

TLS_DIR_ENV = "MANAGED_AGENTS_TLS_DIR"
MESH_NAME = "mesh.managed-agents.internal"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "mesh.crt", "mesh.key"


class MeshTlsError(ValueError):
    """The configured TLS material cannot be used; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class MeshTls:
    """The CA that vouches for mesh peers, and this process's own certificate and key (PEM)."""

    ca: bytes
    cert: bytes
    key: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serves TLS and refuses, at the handshake, a client without a certificate from the mesh's CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Presents this process's certificate and trusts only servers certified by the mesh's CA."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    @classmethod
    def load(cls, directory: Path) -> MeshTls:
        """Reads `ca.crt`, `mesh.crt` and `mesh.key` from `directory`."""
        files = [directory / name for name in (CA_FILE, CERT_FILE, KEY_FILE)]
        try:
            ca, cert, key = (path.read_bytes() for path in files)
        except OSError as error:
            raise MeshTlsError(
                f"{TLS_DIR_ENV}={directory}: {error.filename} cannot be read ({error.strerror}); "
                f"make a dev mesh's files with `managed-agents certs {directory}`"
            ) from None
        for path, data, marker in zip(
            files, (ca, cert, key), (b"CERTIFICATE", b"CERTIFICATE", b"PRIVATE KEY"), strict=True
        ):
            if b"-----BEGIN " not in data or marker not in data:
                raise MeshTlsError(f"{path} is not a PEM {marker.decode().lower()}")
        return cls(ca=ca, cert=cert, key=key)


def mesh_tls(environ: Mapping[str, str]) -> MeshTls | None:
    """The TLS material named by `MANAGED_AGENTS_TLS_DIR`, or None when mutual TLS is not configured."""
    directory = environ.get(TLS_DIR_ENV, "").strip()
    return MeshTls.load(Path(directory)) if directory else None


def write_dev_certs(directory: Path, *, extra_names: Sequence[str] = (), days: int = 365) -> list[Path]:
    """Makes a CA and one peer certificate for a dev mesh in `directory`; returns the files written.

    The peer certificate names `MESH_NAME` plus `localhost`, 127.0.0.1 and `extra_names` (DNS names or IP
    addresses, for clients such as grpcurl that check the address they dial). Keys are readable by their owner
    only. The CA's key is not kept: this CA signs nothing else, and rotating means running the command again.
    """
    ca_key, ca = pki.new_ca("managed-agents dev mesh CA", days=days)
    peer_key, peer = pki.issue(
        ca_key,
        ca,
        common_name=MESH_NAME,
        names=[MESH_NAME, "localhost", "127.0.0.1", *extra_names],
        days=days,
        client=True,
    )
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data, private in (
        (CA_FILE, pki.cert_pem(ca), False),
        (CERT_FILE, pki.cert_pem(peer), False),
        (KEY_FILE, pki.key_pem(peer_key), True),
    ):
        path = directory / name
        pki.write_file(path, data, private=private)
        written.append(path)
    return written
