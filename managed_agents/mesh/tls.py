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

import datetime
import ipaddress
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "managed-agents dev mesh CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    peer_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in (MESH_NAME, "localhost", "127.0.0.1", *extra_names):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    peer = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MESH_NAME)]))
        .issuer_name(ca_name)
        .public_key(peer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_pem = peer_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    written = []
    for name, data, private in (
        (CA_FILE, ca.public_bytes(serialization.Encoding.PEM), False),
        (CERT_FILE, peer.public_bytes(serialization.Encoding.PEM), False),
        (KEY_FILE, key_pem, True),
    ):
        path = directory / name
        mode = stat.S_IRUSR | stat.S_IWUSR if private else stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(path, mode)
        written.append(path)
    return written
