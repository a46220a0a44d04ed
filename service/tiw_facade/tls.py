"""The gRPC server's TLS credentials, from PEM files that are re-read when they change.

cert-manager (or a kubelet updating a mounted Secret) replaces the files in place; grpc asks the
fetcher below for a new configuration before every TLS handshake, so a new connection gets the new
certificate without a restart, and connections already open keep theirs. The fetcher only stats
the files unless one of them changed (inode, mtime or size). A new set is checked with the
standard library's ``ssl`` (the key must match the certificate, the CA file must parse) before
grpc sees it: halfway through a rotation (a new certificate, the old key) the previous set stays
in use, and the files are tried again at the next handshake.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import threading
from typing import TYPE_CHECKING

import grpc

from tiw_facade.settings import variable

if TYPE_CHECKING:
    from tiw_facade.settings import Settings

log = logging.getLogger("tiw_facade.tls")

Stamp = tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM files of the gRPC port's TLS; none: plaintext."""

    cert_file: str = ""  # TIW_TLS_CERT_FILE: the certificate chain
    key_file: str = ""  # TIW_TLS_KEY_FILE: its private key
    client_ca_file: str = ""  # TIW_TLS_CLIENT_CA_FILE: mutual TLS, clients' certificates signed by it

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles:
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)

    @property
    def mode(self) -> str:
        """How the gRPC port is secured, for the start-up log line: off, tls or mutual."""
        if not self.cert_file:
            return "off"
        return "mutual" if self.client_ca_file else "tls"


class TlsFilesError(OSError):
    """The TLS files cannot be used at start; the message names the setting. (An OSError, like a busy
    port: the process logs it and exits 1.)"""


class CertificateFiles:
    """The certificate, key and optional client CA files, as grpc certificate configurations."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.paths = tuple(path for path in (cert_file, key_file, client_ca_file) if path)
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()  # grpc may call the fetcher from several threads
        self._loaded: Stamp = ()
        self._refused: Stamp = ()

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The current configuration; raises OSError, ssl.SSLError or ValueError if it is unusable."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
        chain, key = _read(self.cert_file), _read(self.key_file)
        roots = None
        if self.client_ca_file:
            roots = _read(self.client_ca_file)
            ssl.create_default_context(cadata=roots.decode("ascii"))
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def first(self) -> grpc.ServerCertificateConfiguration:
        """The configuration at start; an unusable one is an error naming the setting."""
        with self._lock:
            try:
                stamp = self._stamp()
                config = self.load()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise TlsFilesError(f"{self._settings_named()}: {_why(exc)}") from None
            self._loaded = stamp
            return config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate-configuration fetcher: a new configuration, or None to keep the current."""
        with self._lock:
            stamp = self._current()
            if stamp is None or stamp in (self._loaded, self._refused):
                return None
            try:
                config = self.load()
            except (OSError, ValueError) as exc:
                self._refused = stamp  # said once per version of the files, not once per handshake
                log.warning(
                    "new TLS files refused; the previous certificate stays in use",
                    extra={"files": self._settings_named(), "error": _why(exc)},
                )
                return None
            if self._current() != stamp:  # changed while being read: read again at the next handshake
                return None
            self._loaded = stamp
            log.info("TLS certificate reloaded", extra={"files": self._settings_named()})
            return config

    def _stamp(self) -> Stamp:
        # os.stat follows symlinks: a kubelet's atomic ..data swap changes the inode.
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, self.paths))

    def _current(self) -> Stamp | None:
        try:
            return self._stamp()
        except OSError:  # a file missing between a delete and a rename
            return None

    def _settings_named(self) -> str:
        names = ["tls_cert_file", "tls_key_file"] + (["tls_client_ca_file"] if self.client_ca_file else [])
        return "/".join(variable(name) for name in names)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials | None:
    """The gRPC server's TLS credentials, or None for plaintext (no certificate configured).

    With a client CA, every client must present a certificate it signed: the handshake refuses
    any other connection.
    """
    cert, key, client_ca = files.cert_file, files.key_file, files.client_ca_file
    if not cert and not key:
        if client_ca:
            raise TlsFilesError(f"{variable('tls_client_ca_file')} needs {variable('tls_cert_file')}")
        return None
    if not (cert and key):
        raise TlsFilesError(f"{variable('tls_cert_file')} and {variable('tls_key_file')} go together")
    certificates = CertificateFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(
        certificates.first(), certificates.fetch, require_client_authentication=bool(client_ca)
    )


class EncryptedKey(ValueError):
    """The key file is encrypted: grpc cannot use it (and OpenSSL would otherwise prompt on a tty)."""


def _no_password() -> bytes:
    raise EncryptedKey("the key is encrypted; give it unencrypted (a Secret protects it)")


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _why(exc: BaseException) -> str:
    """A short reason; never the files' contents (a key must not reach a log)."""
    if isinstance(exc, ssl.SSLError):
        return f"not a usable PEM certificate/key/CA ({exc.reason or 'ssl error'})"
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or type(exc).__name__}".lstrip(": ")
    if isinstance(exc, EncryptedKey):
        return str(exc)
    return f"not usable ({type(exc).__name__})"
