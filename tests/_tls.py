"""TLS for Redis tests: certificates made with the ``openssl`` CLI, and a real
``redis-server`` serving TLS on a port of its own.

- :func:`make_certificates`: a test CA, a server certificate it signs (for
  ``127.0.0.1``, by IP SAN only: connecting as ``localhost`` fails the
  hostname check), a client certificate it signs, and another CA that
  signed neither (``ca.crt``, ``server.crt``/``server.key``,
  ``client.crt``/``client.key``, ``other-ca.crt`` in the directory).
- :func:`tls_args`: the ``redis-server`` arguments for a TLS port (also for
  cluster nodes: add ``--tls-cluster yes``/``--tls-replication yes``).
- :class:`TLSRedisServer`: a :class:`~_redis_server.RedisServer` that also
  listens with TLS on ``tls_port`` (its plain port stays, on 127.0.0.1, for
  the readiness check and for tests that look at the data).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from _ports import free_port
from _redis_server import RedisServer

__all__ = ["Certificates", "TLSRedisServer", "make_certificates", "tls_args"]

_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Certificates:
    """The files :func:`make_certificates` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(
        ["openssl", *args],
        cwd=directory,
        check=True,
        capture_output=True,
        timeout=30,
        env={**os.environ, "OPENSSL_CONF": os.devnull},
    )


def _ca(directory: Path, name: str, subject: str) -> None:
    _openssl(
        directory,
        "req", "-x509", *_EC, "-days", "1",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", subject,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _signed(directory: Path, name: str, subject: str, extensions: str) -> None:
    _openssl(
        directory,
        "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory,
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
    )  # fmt: skip


def make_certificates(directory: Path, server_usage: str = "serverAuth") -> Certificates:
    """A CA, a server and a client certificate it signs, and an unrelated CA.
    ``server_usage``: the server certificate's extended key usage (cluster
    nodes present theirs to each other too: ``"serverAuth,clientAuth"``)."""
    _ca(directory, "ca", "/CN=lapse test CA")
    _ca(directory, "other-ca", "/CN=lapse other test CA")
    _signed(
        directory,
        "server",
        "/CN=127.0.0.1",
        f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={server_usage}\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    _signed(
        directory,
        "client",
        "/CN=lapse test client",
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
    )
    return Certificates(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )


def tls_args(tls_port: int, cert: Path, key: Path, ca: Path, *, auth_clients: bool) -> list[str]:
    """``redis-server`` arguments: TLS on ``tls_port`` with ``cert``/``key``;
    clients must show a certificate ``ca`` signed when ``auth_clients``."""
    return [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "yes" if auth_clients else "no",
    ]  # fmt: skip


class TLSRedisServer(RedisServer):
    """A real ``redis-server`` with a TLS port (``tls_port``) besides its plain one."""

    def __init__(self, cert: Path, key: Path, ca: Path, *, auth_clients: bool) -> None:
        self.tls_port = free_port()
        super().__init__(args=tls_args(self.tls_port, cert, key, ca, auth_clients=auth_clients))
        self.tls_url = f"rediss://127.0.0.1:{self.tls_port}/0"
