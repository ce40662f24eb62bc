"""The Redis store's URL, checked. Forms (``rediss`` for TLS in each):

- ``redis://[[user]:password@]host[:port][/db][?options]``: one node;
- ``redis+cluster://[[user]:password@]host:port[,host:port...][/][?options]``:
  a Redis Cluster, by seed nodes (a cluster has db 0 only);
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db][?options]``:
  the primary a set of sentinels names ``SERVICE`` (the password is the
  primary's; ``sentinel_password=`` the sentinels').

Hosts are names, IPv4 addresses or ``[IPv6]`` ones; the port defaults to
6379 (26379 for sentinels). Options: ``prefix=``, ``shards=N`` (1..1024),
``wait_replicas=N`` (0..16: every write waits for N replicas, ``WAIT``);
``sentinel_password=`` (sentinel forms); on the TLS forms ``ssl_ca_certs=``,
``ssl_certfile=`` with ``ssl_keyfile=``, ``ssl_cert_reqs=required|optional|none``
and ``ssl_check_hostname=yes|no``. Anything wrong is a
:class:`StoreConfigError` naming it (never a password).
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NoReturn, cast
from urllib.parse import parse_qs, unquote

from lapse.sessions.store import StoreConfigError
from lapse.sessions.stores import check_no_control
from lapse.sessions.stores.redis.layout import MAX_SHARDS

__all__ = ["MAX_NODES", "MAX_SHARDS", "TLSOptions", "Target", "parse_url", "redact"]

Kind = Literal["single", "cluster", "sentinel"]
CertReqs = Literal["required", "optional", "none"]

MAX_NODES = 64
"""The most hosts (seed nodes, sentinels) one URL may list."""
MAX_WAIT_REPLICAS = 16
"""The largest ``wait_replicas=``."""

_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_SCHEME_NAMES = ", ".join(f"{name}://" for name in _SCHEMES)
_DEFAULT_PORT: dict[Kind, int] = {"single": 6379, "cluster": 6379, "sentinel": 26379}

_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_CERT_REQS: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}
_YES_NO = {"yes": True, "true": True, "no": False, "false": False}

_Bad = Callable[[str], StoreConfigError]
"""``bad``: the error (to raise) for a reason."""


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """How a TLS connection verifies the server and proves who the client is.

    ``cert_reqs``: ``required`` (the default) verifies the server's
    certificate against ``ca_certs`` (else the system's CAs) and, with
    ``check_hostname``, that it names the host connected to; ``optional``
    is accepted for redis-py's URLs and verifies exactly as ``required``
    does (on a client, OpenSSL makes no difference); ``none`` verifies
    nothing (encryption without authentication of the server).
    ``certfile``/``keyfile``: the client certificate and its (unencrypted)
    key, for servers that require one (``tls-auth-clients yes``).
    """

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: CertReqs = "required"
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        """A new client ``SSLContext`` for these options; :class:`StoreConfigError`
        naming the option whose file is missing, unreadable or not what it says."""
        for option, path in (
            ("ssl_ca_certs", self.ca_certs),
            ("ssl_certfile", self.certfile),
            ("ssl_keyfile", self.keyfile),
        ):
            if path is not None:
                _check_readable(option, path)
        if self.cert_reqs == "none":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            try:
                context = ssl.create_default_context(cafile=self.ca_certs)
            except ssl.SSLError as exc:
                raise StoreConfigError(
                    f"ssl_ca_certs: {self.ca_certs!r} is not a file of PEM CA certificates ({exc})"
                ) from None
            context.check_hostname = self.check_hostname
            context.verify_mode = _CERT_REQS[self.cert_reqs]
        if self.certfile is not None:
            try:
                context.load_cert_chain(self.certfile, self.keyfile, password=_no_password)
            except (ssl.SSLError, _EncryptedKey) as exc:
                raise StoreConfigError(
                    f"ssl_certfile/ssl_keyfile: cannot use {self.certfile!r} with "
                    f"{self.keyfile!r} as the client certificate and key: {_ssl_reason(exc)}"
                ) from None
        return context


class _EncryptedKey(Exception):
    """The key file asks for a password (which OpenSSL would prompt for)."""


def _no_password() -> NoReturn:
    # Without this callback OpenSSL would ask for the password on the terminal.
    raise _EncryptedKey("the key is encrypted: give an unencrypted key file")


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc})"
    return str(exc)


def _check_readable(option: str, path: str) -> None:
    if not path:
        raise StoreConfigError(f"{option} must name a file, not be empty")
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise StoreConfigError(f"{option}: {path!r} is a directory, not a file")
        if not stat.S_ISREG(mode):  # a FIFO would block the open (and start-up) forever
            raise StoreConfigError(f"{option}: {path!r} is not a regular file")
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise StoreConfigError(f"{option}: cannot read {path!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed store URL.

    ``host``/``port`` are the first of ``nodes`` (the one node; the first
    seed; the first sentinel). ``tls`` says the scheme is ``rediss``;
    ``ssl_context`` is the context every connection of the store uses (made
    once, when the URL is parsed: its files are read then), ``None`` without
    TLS. ``db`` is 0 on a cluster. ``shards`` is ``None`` unless the URL says.
    """

    tls: bool
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    prefix: str | None
    redacted: str
    kind: Kind = "single"
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    sentinel_password: str | None = None
    shards: int | None = None
    wait_replicas: int = 0
    tls_options: TLSOptions | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            object.__setattr__(self, "nodes", ((self.host, self.port),))


def redact(url: str) -> str:
    """``url`` with its passwords replaced by ``***``: the one after ``user:``,
    and the value of every query option whose name says ``password``.

    A password holding a ``/``, ``?`` or ``#`` that should have been
    percent-encoded ends the host part early: when an ``@`` comes after
    such a character (before the query), everything up to that ``@`` is
    hidden, so even a malformed URL does not show it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for stop in "/?#":
        pos = rest.find(stop)
        if pos != -1:
            end = min(end, pos)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostport}"
    else:
        before_query = tail.split("?", 1)[0]
        if "@" in before_query:
            cut = before_query.rindex("@")
            return f"{scheme}://***@{_redact_query(tail[cut + 1 :])}"
    return f"{scheme}://{netloc}{_redact_query(tail)}"


def _redact_query(tail: str) -> str:
    path, question, query = tail.partition("?")
    if not question:
        return tail
    query, hash_, fragment = query.partition("#")
    pairs = query.split("&")
    for index, pair in enumerate(pairs):
        name, equals, _ = pair.partition("=")
        if equals and "password" in unquote(name).lower():
            pairs[index] = f"{name}=***"
    return f"{path}?{'&'.join(pairs)}{hash_}{fragment}"


def parse_url(url: str) -> Target:
    """Check a store URL; :class:`StoreConfigError` naming what is wrong."""
    if not isinstance(url, str):
        raise StoreConfigError(f"a Redis store URL is a string, not {type(url).__name__}")
    check_no_control(url, "a Redis store URL")
    redacted = redact(url)

    def bad(why: str) -> StoreConfigError:
        return StoreConfigError(f"bad Redis store URL {redacted!r}: {why}")

    scheme_text, sep, rest = url.partition("://")
    scheme = scheme_text.lower()
    if not sep or scheme not in _SCHEMES:
        if ":" not in url:
            raise bad(f"no scheme: a Redis store URL starts with one of {_SCHEME_NAMES}")
        shown = url.partition(":")[0] + ":"
        raise bad(f"unknown scheme {shown!r}: use one of {_SCHEME_NAMES}")
    kind, tls = _SCHEMES[scheme]
    rest, hash_, _ = rest.partition("#")
    if hash_:
        raise bad("a fragment (#...) means nothing here")
    rest, _, query_text = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    path = slash + path

    userinfo, at, hosts_text = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = (unquote(password_text) or None) if colon else None
    nodes = _parse_nodes(hosts_text, kind, bad)

    db = 0
    service: str | None = None
    if kind == "single":
        if path not in ("", "/"):
            if not re.fullmatch(r"/\d+", path):
                raise bad(f"the path must be /<db number>, not {path!r}")
            db = int(path[1:])
    elif kind == "cluster":
        if path not in ("", "/", "/0"):
            raise bad(f"a cluster has db 0 only: no path, not {path!r}")
    else:
        service, db = _parse_sentinel_path(path, bad)

    options = _parse_query(query_text, bad)
    prefix = options.pop("prefix", None)
    if prefix is not None and not prefix:
        raise bad("prefix must not be empty")
    shards = _parse_shards(options.pop("shards", None), bad)
    wait_text = options.pop("wait_replicas", "0")
    if not wait_text.isascii() or not wait_text.isdigit() or int(wait_text) > MAX_WAIT_REPLICAS:
        raise bad(
            f"wait_replicas must be a whole number from 0 to {MAX_WAIT_REPLICAS}, not {wait_text!r}"
        )
    sentinel_password: str | None = None
    if "sentinel_password" in options:
        if kind != "sentinel":
            raise bad("sentinel_password is an option of redis+sentinel:// URLs only")
        sentinel_password = options.pop("sentinel_password") or None
    tls_options = _parse_tls_options(options, tls, bad)
    if options:
        name = sorted(options)[0]
        raise bad(f"unknown option {name!r} (options: {_known_options(kind, tls)})")
    context: ssl.SSLContext | None = None
    if tls_options is not None:
        try:
            context = tls_options.context()
        except StoreConfigError as exc:
            raise bad(str(exc)) from None
    host, port = nodes[0]
    return Target(
        tls=tls,
        host=host,
        port=port,
        db=db,
        username=username,
        password=password,
        prefix=prefix,
        redacted=redacted,
        kind=kind,
        nodes=nodes,
        service=service,
        sentinel_password=sentinel_password,
        shards=shards,
        wait_replicas=int(wait_text),
        tls_options=tls_options,
        ssl_context=context,
    )


def _parse_nodes(text: str, kind: Kind, bad: _Bad) -> tuple[tuple[str, int], ...]:
    entries = text.split(",")
    if kind == "single" and len(entries) > 1:
        raise bad("one host only: a list of hosts needs redis+cluster:// or redis+sentinel://")
    if len(entries) > MAX_NODES:
        raise bad(f"at most {MAX_NODES} hosts, not {len(entries)}")
    nodes: list[tuple[str, int]] = []
    for position, entry in enumerate(entries, 1):
        where = "" if len(entries) == 1 else f" (host {position} of the list)"
        if not entry:
            raise bad("no host" + where)
        host, port = _parse_node(entry, _DEFAULT_PORT[kind], bad, where)
        if (host, port) in nodes:
            raise bad(f"{_show(host, port)} is listed twice")
        nodes.append((host, port))
    return tuple(nodes)


def _parse_node(entry: str, default_port: int, report: _Bad, where: str) -> tuple[str, int]:
    def bad(why: str) -> StoreConfigError:
        return report(why + where)

    if entry.startswith("["):
        address, bracket, port_text = entry[1:].partition("]")
        if not bracket:
            raise bad(f"no ']' closing the IPv6 address in {entry!r}")
        if port_text and not port_text.startswith(":"):
            raise bad(f"':port' must follow ']' in {entry!r}")
        port_text = port_text[1:]
        if "%" in address:
            raise bad(f"IPv6 zone indexes are not supported: {entry!r}")
        try:
            host = str(ipaddress.IPv6Address(address))
        except ValueError:
            raise bad(f"{address!r} is not an IPv6 address") from None
    else:
        if entry.count(":") > 1:
            raise bad(f"an IPv6 address goes in [brackets]: {entry!r}")
        host, _, port_text = entry.partition(":")
        if not host:
            raise bad("no host")
        if not _HOST_NAME.fullmatch(host) or len(host) > 253:
            raise bad(f"{host!r} is not a host name or IPv4 address (IPv6 goes in [brackets])")
        host = host.lower()
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not port_text.isascii() or not 0 < int(port_text) < 65536:
        raise bad("the port must be a number from 1 to 65535")
    return host, int(port_text)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_sentinel_path(path: str, bad: _Bad) -> tuple[str, int]:
    segments = path.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()  # one trailing slash
    if not segments or not segments[0]:
        raise bad("no SERVICE: name the primary, redis+sentinel://host:port/SERVICE[/db]")
    if len(segments) > 2:
        raise bad(f"the path must be /SERVICE or /SERVICE/<db number>, not {path!r}")
    service = unquote(segments[0])
    if "@" in service:
        raise bad(
            "the SERVICE holds '@': percent-encode a password's '/', '?', '#' as %2F, %3F, %23"
        )
    if not service or any(char.isspace() for char in service) or len(service) > 256:
        raise bad("SERVICE must be 1 to 256 characters, without spaces")
    if not service.isprintable():
        raise bad("SERVICE cannot hold control characters")
    db = 0
    if len(segments) == 2:
        if not re.fullmatch(r"\d+", segments[1]):
            raise bad(f"the db after the SERVICE must be a number, not {segments[1]!r}")
        db = int(segments[1])
    return service, db


def _parse_query(text: str, bad: _Bad) -> dict[str, str]:
    try:
        query = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError as exc:
        raise bad(f"bad query: {exc}") from None
    options: dict[str, str] = {}
    for name, values in query.items():
        if len(values) != 1:
            raise bad(f"{name} is given {len(values)} times")
        options[name] = values[0]
    return options


def _parse_shards(text: str | None, bad: _Bad) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_SHARDS:
        raise bad(f"shards must be a whole number from 1 to {MAX_SHARDS}, not {text!r}")
    return int(text)


def _parse_tls_options(options: dict[str, str], tls: bool, bad: _Bad) -> TLSOptions | None:
    given = {name: options.pop(name) for name in _TLS_OPTIONS if name in options}
    if not tls:
        if given:
            name = next(iter(given))
            raise bad(f"{name} is a TLS option: use a rediss scheme (rediss://, ...) for TLS")
        return None
    cert_reqs = given.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise bad(f"ssl_cert_reqs must be required, optional or none, not {cert_reqs!r}")
    check_hostname = cert_reqs != "none"
    if "ssl_check_hostname" in given:
        answer = given["ssl_check_hostname"].lower()
        if answer not in _YES_NO:
            raise bad(f"ssl_check_hostname must be yes or no, not {answer!r}")
        check_hostname = _YES_NO[answer]
        if check_hostname and cert_reqs == "none":
            raise bad(
                "ssl_check_hostname=yes needs the certificate verified: not ssl_cert_reqs=none"
            )
    ca_certs = given.get("ssl_ca_certs")
    if ca_certs is not None and cert_reqs == "none":
        raise bad("ssl_ca_certs is not used with ssl_cert_reqs=none (nothing is verified)")
    certfile = given.get("ssl_certfile")
    keyfile = given.get("ssl_keyfile")
    if (certfile is None) != (keyfile is None):
        raise bad("ssl_certfile and ssl_keyfile go together: give both or neither")
    return TLSOptions(
        ca_certs=ca_certs,
        certfile=certfile,
        keyfile=keyfile,
        cert_reqs=cast(CertReqs, cert_reqs),
        check_hostname=check_hostname,
    )


def _known_options(kind: Kind, tls: bool) -> str:
    names = ["prefix", "shards", "wait_replicas"]
    if kind == "sentinel":
        names.append("sentinel_password")
    if tls:
        names.extend(_TLS_OPTIONS)
    return ", ".join(names)
