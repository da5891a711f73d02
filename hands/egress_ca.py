"""The certificate authority that sandboxes' HTTPS goes through.

A sandbox's HTTPS requests are tunnelled (`CONNECT`) to its egress relay, which must read them to put the
sandbox's keys in: so the relay ends the TLS session itself, with a certificate for the host asked for,
issued by this CA. Only sandboxes trust it (its certificate is in their control directory, named by
`SSL_CERT_FILE` and friends); the real upstream's certificate is checked by the mcp_proxy, which makes the
real request. One CA per work root, kept across restarts so that adopted sandboxes keep trusting it; its
key stays outside every sandbox.
"""

from __future__ import annotations

import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from managed_agents.mesh import pki

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
_CACHED_HOSTS = 256
_LEAF_DAYS = 30


class EgressCA:
    """Issues server certificates for the hosts sandboxes connect to, and TLS contexts that present them."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self._cert = cert
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load_or_create(cls, directory: Path) -> EgressCA:
        """The CA kept in `directory`, made there (key mode 0600) the first time."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = directory / CA_KEY, directory / CA_CERT
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key, cert = pki.new_ca("managed-agents sandbox egress CA", days=3650)
        pki.write_file(key_path, pki.key_pem(key), private=True)
        pki.write_file(cert_path, pki.cert_pem(cert), private=False)
        return cls(key, cert)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, for sandboxes to trust."""
        return pki.cert_pem(self._cert)

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a certificate for `host` (a name or an IP address)."""
        host = host.lower()
        with self._lock:
            context = self._contexts.get(host)
            if context is not None:
                self._contexts.move_to_end(host)
                return context
        context = self._issue(host)
        with self._lock:
            self._contexts[host] = context
            while len(self._contexts) > _CACHED_HOSTS:
                self._contexts.popitem(last=False)
        return context

    def _issue(self, host: str) -> ssl.SSLContext:
        key, cert = pki.issue(self._key, self._cert, common_name=host, names=[host], days=_LEAF_DAYS)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # `load_cert_chain` reads files only; these live a moment in a private temporary directory.
        with tempfile.TemporaryDirectory() as scratch:
            chain, key_file = Path(scratch) / "chain.pem", Path(scratch) / "key.pem"
            chain.write_bytes(pki.cert_pem(cert) + self.cert_pem)
            pki.write_file(key_file, pki.key_pem(key), private=True)
            context.load_cert_chain(chain, key_file)
        return context
