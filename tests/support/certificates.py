"""Certificates made here, and the files a facade's TLS settings name, rotated as Kubernetes does."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM."""

    cert: bytes
    key: bytes
    _certificate: x509.Certificate
    _private_key: ec.EllipticCurvePrivateKey

    def issue(self, common_name: str, sans: Sequence[x509.GeneralName] = ()) -> Issued:
        """A leaf certificate this CA signs."""
        return _make(common_name, sans, issuer=self)


def _make(common_name: str, sans: Sequence[x509.GeneralName], issuer: Issued | None = None) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer._certificate.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    certificate = builder.sign(issuer._private_key if issuer else key, hashes.SHA256())
    return Issued(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        certificate,
        key,
    )


def authority(name: str = "test CA") -> Issued:
    """A self-signed CA."""
    return _make(name, ())


def server_cert(ca: Issued) -> Issued:
    """The facade's certificate for 127.0.0.1 and localhost, signed by ``ca``."""
    return ca.issue("facade", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])


def replace(path: pathlib.Path, content: bytes) -> None:
    """Write a new file and rename it over the old one, as cert-manager and the kubelet do."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(content)
    os.replace(fresh, path)


@dataclasses.dataclass
class Files:
    """A server certificate signed by ``ca`` and ``ca`` as the client CA, in ``directory``."""

    ca: Issued
    directory: pathlib.Path

    def __post_init__(self) -> None:
        served = server_cert(self.ca)
        self.write("server.crt", served.cert)
        self.write("server.key", served.key)
        self.write("client-ca.crt", self.ca.cert)

    def write(self, name: str, content: bytes) -> None:
        replace(self.directory / name, content)

    def env(self, *, mutual: bool) -> dict[str, str]:
        """The facade's TLS settings for these files; ``mutual`` asks callers for certificates."""
        found = {
            "TIW_TLS_CERT_FILE": str(self.directory / "server.crt"),
            "TIW_TLS_KEY_FILE": str(self.directory / "server.key"),
        }
        if mutual:
            found["TIW_TLS_CLIENT_CA_FILE"] = str(self.directory / "client-ca.crt")
        return found
