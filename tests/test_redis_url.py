"""Redis store URLs (lapse.sessions.stores.redis.url): every accepted form
(one node, a cluster's seeds, sentinels), its options (prefix, shards,
sentinel_password, TLS), every error, and redaction. Parsing touches no
network; the TLS options are checked against real certificate files (made
with openssl). What the TLS context does on the wire: test_redis_tls.py."""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

import pytest
from _tls import Certificates, make_certificates

from lapse.sessions.store import StoreConfigError
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis.url import MAX_NODES, Target, TLSOptions, parse_url, redact

PASSWORD = "s3cret-Pa55word"
SENTINEL_PASSWORD = "sentinel-S3cret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("url-tls"))


def config_error(url: str) -> str:
    """The message of the StoreConfigError ``url`` raises (checked to name
    the URL and to hide both passwords)."""
    with pytest.raises(StoreConfigError) as caught:
        parse_url(url)
    message = str(caught.value)
    assert message.startswith("bad Redis store URL "), message
    assert PASSWORD not in message and SENTINEL_PASSWORD not in message, message
    return message


# -- one node ------------------------------------------------------------------------


def test_a_single_node_url_keeps_every_attribute_the_store_reads() -> None:
    target = parse_url(f"redis://alice:{PASSWORD}@Cache.Example:7000/3?prefix=app&shards=8")
    assert (target.kind, target.tls, target.host, target.port, target.db) == (
        "single",
        False,
        "cache.example",
        7000,
        3,
    )
    assert (target.username, target.password, target.prefix, target.shards) == (
        "alice",
        PASSWORD,
        "app",
        8,
    )
    assert target.nodes == (("cache.example", 7000),)
    assert target.redacted == "redis://alice:***@Cache.Example:7000/3?prefix=app&shards=8"
    assert (target.service, target.sentinel_password) == (None, None)
    assert (target.tls_options, target.ssl_context) == (None, None)


@pytest.mark.parametrize(
    ("url", "host", "port", "db"),
    [
        ("redis://localhost", "localhost", 6379, 0),
        ("redis://h:/", "h", 6379, 0),
        ("REDIS://10.0.0.7:6380/15", "10.0.0.7", 6380, 15),
        ("redis://[::1]", "::1", 6379, 0),
        ("redis://[2001:DB8::1]:7000/2", "2001:db8::1", 7000, 2),
        ("redis://under_score.example/", "under_score.example", 6379, 0),
    ],
)
def test_single_node_hosts_ports_and_dbs(url: str, host: str, port: int, db: int) -> None:
    """Names (lowercased), IPv4, [IPv6] (normalized); port 6379 and db 0 by default."""
    target = parse_url(url)
    assert (target.host, target.port, target.db, target.nodes) == (host, port, db, ((host, port),))


def test_without_a_password_there_is_none_and_an_empty_one_is_none() -> None:
    assert parse_url("redis://user@h").password is None
    assert parse_url("redis://user@h").username == "user"
    assert parse_url("redis://:@h").password is None
    assert parse_url("redis://:p%40ss%2Fw@h").password == "p@ss/w"  # percent-decoded


def test_a_target_built_by_hand_has_its_host_as_its_one_node() -> None:
    target = Target(
        tls=False, host="h", port=1, db=0, username=None, password=None, prefix=None, redacted="x"
    )
    assert (target.kind, target.nodes, target.shards) == ("single", (("h", 1),), None)


# -- cluster ------------------------------------------------------------------------


def test_a_cluster_url_lists_its_seed_nodes() -> None:
    url = f"redis+cluster://:{PASSWORD}@n1:7000,N2,10.0.0.3:7002,[::1]:7003/?prefix=p&shards=64"
    target = parse_url(url)
    assert target.kind == "cluster" and not target.tls
    assert target.nodes == (("n1", 7000), ("n2", 6379), ("10.0.0.3", 7002), ("::1", 7003))
    assert (target.host, target.port) == ("n1", 7000)  # the first seed
    assert (target.db, target.password, target.prefix, target.shards) == (0, PASSWORD, "p", 64)
    assert target.redacted == url.replace(PASSWORD, "***")


@pytest.mark.parametrize("path", ["", "/", "/0"])
def test_a_cluster_url_takes_no_path_or_db_0(path: str) -> None:
    assert parse_url(f"redis+cluster://n1:7000,n2:7001{path}").db == 0


def test_a_cluster_url_with_another_db_is_an_error() -> None:
    assert "a cluster has db 0 only" in config_error("redis+cluster://n1:7000/3")
    assert "a cluster has db 0 only" in config_error("redis+cluster://n1:7000/svc")


# -- sentinel ------------------------------------------------------------------------


def test_a_sentinel_url_names_the_service_and_db_and_both_passwords() -> None:
    url = (
        f"redis+sentinel://app:{PASSWORD}@s1,s2:26380,[::1]/mymaster/2"
        f"?sentinel_password={SENTINEL_PASSWORD}&prefix=p"
    )
    target = parse_url(url)
    assert target.kind == "sentinel"
    assert target.nodes == (("s1", 26379), ("s2", 26380), ("::1", 26379))  # 26379 by default
    assert (target.service, target.db) == ("mymaster", 2)
    assert (target.username, target.password) == ("app", PASSWORD)  # the primary's
    assert target.sentinel_password == SENTINEL_PASSWORD
    assert target.redacted == (
        "redis+sentinel://app:***@s1,s2:26380,[::1]/mymaster/2?sentinel_password=***&prefix=p"
    )


@pytest.mark.parametrize(
    ("path", "service", "db"),
    [("/mymaster", "mymaster", 0), ("/mymaster/", "mymaster", 0), ("/my%2Dm.1/4/", "my-m.1", 4)],
)
def test_sentinel_paths(path: str, service: str, db: int) -> None:
    target = parse_url(f"redis+sentinel://s1{path}")
    assert (target.service, target.db) == (service, db)


@pytest.mark.parametrize("path", ["", "/", "//1"])
def test_a_sentinel_url_without_a_service_is_an_error(path: str) -> None:
    assert "no SERVICE" in config_error(f"redis+sentinel://s1:26379{path}")


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/m/1/2", "/SERVICE or /SERVICE/<db number>"),
        ("/m/x", "must be a number"),
        ("/m%20%09x", "SERVICE must be 1 to 256 characters, without spaces"),
        ("/" + "m" * 257, "SERVICE must be 1 to 256 characters"),
        ("/m%00", "SERVICE cannot hold control characters"),
    ],
)
def test_bad_sentinel_paths_are_errors(path: str, why: str) -> None:
    assert why in config_error(f"redis+sentinel://s1{path}")


def test_a_password_with_an_unescaped_slash_is_never_shown() -> None:
    """``/`` in a password must be %2F: unescaped, it ends the host part and
    the rest looks like a SERVICE holding '@'; the error says so and hides it."""
    message = config_error("redis+sentinel://u:1234/x@s1/mymaster")
    assert "percent-encode" in message and "1234" not in message
    assert "redis+sentinel://***@s1/mymaster" in message
    message = config_error(f"redis://:{PASSWORD}/x@h/0")
    assert "redis://***@h/0" in message


def test_sentinel_password_belongs_to_sentinel_urls_only() -> None:
    message = config_error(f"redis://h/0?sentinel_password={SENTINEL_PASSWORD}")
    assert "redis+sentinel:// URLs only" in message


# -- shards, hosts, options ----------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster", "rediss+cluster"])
@pytest.mark.parametrize("shards", [1, 1024])
def test_shards_from_1_to_1024_on_every_form(scheme: str, shards: int) -> None:
    assert parse_url(f"{scheme}://h:1/?shards={shards}").shards == shards
    assert parse_url(f"{scheme}://h:1/").shards is None  # the store decides


@pytest.mark.parametrize("value", ["0", "1025", "-1", "1.5", "x", "", "%EF%BC%93"])
def test_shards_outside_1_to_1024_or_not_a_whole_number_are_errors(value: str) -> None:
    assert "shards must be a whole number from 1 to 1024" in config_error(
        f"redis+cluster://h:1/?shards={value}"
    )


@pytest.mark.parametrize(
    ("hosts", "why"),
    [
        ("a:1,a:1", "a:1 is listed twice"),
        ("a,A:6379", "a:6379 is listed twice"),  # the default port, case folded
        ("[::1]:7,[0::1]:7", "[::1]:7 is listed twice"),
        ("a:1,,b:2", "no host (host 2 of the list)"),
        ("a:1,", "no host (host 2 of the list)"),
        (",a:1", "no host (host 1 of the list)"),
        ("a:1,b:x", "the port must be a number from 1 to 65535 (host 2 of the list)"),
        ("a:1,b:0", "the port must be a number from 1 to 65535"),
        ("a:1,b:65536", "the port must be a number from 1 to 65535"),
        ("[zz]:1", "'zz' is not an IPv6 address"),
        ("[::1:1", "no ']'"),
        ("[::1]1", "':port' must follow ']'"),
        ("[fe80::1%25eth0]:1", "zone indexes are not supported"),
        ("::1:7000", "an IPv6 address goes in [brackets]: '::1:7000'"),
        ("bad host:1", "not a host name"),
        ("-bad:1", "not a host name"),
    ],
)
def test_bad_host_lists_are_errors(hosts: str, why: str) -> None:
    assert why in config_error(f"redis+cluster://:{PASSWORD}@{hosts}/")


def test_at_most_64_hosts() -> None:
    hosts = ",".join(f"n{index}:7000" for index in range(MAX_NODES))
    assert len(parse_url(f"redis+cluster://{hosts}").nodes) == MAX_NODES
    assert f"at most {MAX_NODES} hosts" in config_error(f"redis+cluster://{hosts},extra:7000")


def test_a_list_of_hosts_on_a_single_node_url_is_an_error() -> None:
    assert "one host only" in config_error("redis://a:1,b:2/0")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("hello", "no scheme"),
        ("http://h", "unknown scheme 'http:'"),
        ("redis+valkey://h", "unknown scheme 'redis+valkey:'"),
        ("redis:h", "unknown scheme 'redis:'"),
        ("redis:///0", "no host"),
        ("redis://h:1/0#frag", "a fragment"),
        ("redis://h/0?nope=1", "unknown option 'nope' (options: prefix, shards, wait_replicas)"),
        (
            "rediss+sentinel://s/m?nope=1",
            "(options: prefix, shards, wait_replicas, sentinel_password, ssl_ca_certs, "
            "ssl_certfile, ssl_keyfile, ssl_cert_reqs, ssl_check_hostname)",
        ),
        ("redis://h/0?prefix=", "prefix must not be empty"),
        ("redis://h/0?prefix=a&prefix=b", "prefix is given 2 times"),
        ("redis+cluster://h:1?shards=2&shards=2", "shards is given 2 times"),
        ("redis://h/0?prefix", "bad query"),
    ],
)
def test_scheme_and_option_errors(url: str, why: str) -> None:
    assert why in config_error(url)


def test_a_url_that_is_not_a_string_is_an_error() -> None:
    with pytest.raises(StoreConfigError, match="is a string, not bytes"):
        parse_url(b"redis://h")  # type: ignore[arg-type]


# -- TLS options ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["rediss", "rediss+cluster", "rediss+sentinel"])
def test_every_tls_scheme_verifies_the_server_by_default(scheme: str) -> None:
    """No option: the system's CAs, the certificate required, the hostname checked."""
    target = parse_url(f"{scheme}://h:1/svc" if "sentinel" in scheme else f"{scheme}://h:1")
    assert target.tls and target.tls_options == TLSOptions()
    context = target.ssl_context
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 0 or not ssl.get_default_verify_paths().cafile


@pytest.mark.parametrize("scheme", ["rediss", "rediss+cluster", "rediss+sentinel"])
def test_every_tls_scheme_takes_the_tls_options(scheme: str, certs: Certificates) -> None:
    url = (
        f"{scheme}://h:1/svc?ssl_ca_certs={certs.ca}&ssl_certfile={certs.client_cert}"
        f"&ssl_keyfile={certs.client_key}&ssl_cert_reqs=required&ssl_check_hostname=no"
    ).replace("/svc", "/svc" if "sentinel" in scheme else "/")
    target = parse_url(url)
    assert target.tls_options == TLSOptions(
        ca_certs=str(certs.ca),
        certfile=str(certs.client_cert),
        keyfile=str(certs.client_key),
        cert_reqs="required",
        check_hostname=False,
    )
    context = target.ssl_context
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 1  # the given CA only, not the system's


@pytest.mark.parametrize(
    ("query", "mode", "check_hostname"),
    [
        ("ssl_cert_reqs=none", ssl.CERT_NONE, False),
        ("ssl_cert_reqs=NONE&ssl_check_hostname=no", ssl.CERT_NONE, False),
        ("ssl_cert_reqs=optional", ssl.CERT_OPTIONAL, True),
        ("ssl_cert_reqs=required&ssl_check_hostname=yes", ssl.CERT_REQUIRED, True),
        ("ssl_check_hostname=false", ssl.CERT_REQUIRED, False),
    ],
)
def test_verification_modes(query: str, mode: ssl.VerifyMode, check_hostname: bool) -> None:
    context = parse_url(f"rediss://h?{query}").ssl_context
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (mode, check_hostname)


@pytest.mark.parametrize(
    "option",
    [
        "ssl_ca_certs=x",
        "ssl_certfile=x",
        "ssl_keyfile=x",
        "ssl_cert_reqs=none",
        "ssl_check_hostname=no",
    ],
)
@pytest.mark.parametrize("scheme", ["redis", "redis+cluster", "redis+sentinel"])
def test_tls_options_without_tls_are_errors(scheme: str, option: str) -> None:
    name = option.split("=")[0]
    path = "/svc" if scheme == "redis+sentinel" else "/"
    message = config_error(f"{scheme}://:{PASSWORD}@h{path}?{option}")
    assert f"{name} is a TLS option: use a rediss scheme" in message


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("ssl_cert_reqs=maybe", "ssl_cert_reqs must be required, optional or none, not 'maybe'"),
        ("ssl_check_hostname=perhaps", "ssl_check_hostname must be yes or no"),
        ("ssl_cert_reqs=none&ssl_check_hostname=yes", "needs the certificate verified"),
        ("ssl_cert_reqs=none&ssl_ca_certs=CA", "ssl_ca_certs is not used with ssl_cert_reqs=none"),
        ("ssl_certfile=CERT", "ssl_certfile and ssl_keyfile go together"),
        ("ssl_keyfile=KEY", "ssl_certfile and ssl_keyfile go together"),
        ("ssl_ca_certs=CA&ssl_ca_certs=CA", "ssl_ca_certs is given 2 times"),
        ("ssl_ca_certs=", "ssl_ca_certs must name a file, not be empty"),
    ],
)
def test_bad_tls_options_are_errors(query: str, why: str, certs: Certificates) -> None:
    query = query.replace("CA", str(certs.ca)).replace("CERT", str(certs.client_cert))
    query = query.replace("KEY", str(certs.client_key))
    assert why in config_error(f"rediss://:{PASSWORD}@h/0?{query}")


def test_a_missing_file_is_an_error_naming_its_option(tmp_path: Path, certs: Certificates) -> None:
    missing = tmp_path / "nope.pem"
    message = config_error(f"rediss://:{PASSWORD}@h/0?ssl_ca_certs={missing}")
    assert f"ssl_ca_certs: cannot read {str(missing)!r}: No such file or directory" in message
    message = config_error(f"rediss://h/0?ssl_certfile={certs.client_cert}&ssl_keyfile={missing}")
    assert "ssl_keyfile: cannot read" in message
    message = config_error(f"rediss://h/0?ssl_certfile={tmp_path}&ssl_keyfile={certs.client_key}")
    assert f"ssl_certfile: {str(tmp_path)!r} is a directory" in message


def test_a_fifo_is_refused_before_opening_it_would_block_start_up(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    message = config_error(f"rediss://h?ssl_ca_certs={fifo}")
    assert f"ssl_ca_certs: {str(fifo)!r} is not a regular file" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_an_error_naming_its_option(tmp_path: Path) -> None:
    locked = tmp_path / "ca.pem"
    locked.write_text("x")
    locked.chmod(0)
    assert "ssl_ca_certs: cannot read" in config_error(f"rediss://h?ssl_ca_certs={locked}")


def test_a_ca_file_without_certificates_is_an_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    message = config_error(f"rediss://:{PASSWORD}@h?ssl_ca_certs={junk}")
    assert f"ssl_ca_certs: {str(junk)!r} is not a file of PEM CA certificates" in message


def test_a_key_that_does_not_match_the_certificate_is_an_error(certs: Certificates) -> None:
    url = f"rediss://h?ssl_certfile={certs.client_cert}&ssl_keyfile={certs.server_key}"
    message = config_error(url)
    assert "ssl_certfile/ssl_keyfile: cannot use" in message
    assert "KEY_VALUES_MISMATCH" in message


def test_an_encrypted_key_is_an_error_not_a_password_prompt(
    tmp_path: Path, certs: Certificates
) -> None:
    """OpenSSL would ask for the key's password on the terminal (a server
    starting as a service would hang): lapse refuses the key instead."""
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(certs.client_key), "-out", str(encrypted),
         "-aes256", "-passout", "pass:secret"],
        check=True,
        capture_output=True,
        timeout=30,
        env={**os.environ, "OPENSSL_CONF": os.devnull},
    )  # fmt: skip
    url = f"rediss://h?ssl_certfile={certs.client_cert}&ssl_keyfile={encrypted}"
    assert "the key is encrypted: give an unencrypted key file" in config_error(url)


def test_the_store_takes_tls_urls_and_reports_their_errors(certs: Certificates) -> None:
    """RedisStore (as the lead's store.py reads the Target today) builds from
    a TLS URL with options, and a bad option is its StoreConfigError."""
    store = RedisStore(f"rediss://user:{PASSWORD}@h:6380/0?ssl_ca_certs={certs.ca}")
    assert store.url == f"rediss://user:***@h:6380/0?ssl_ca_certs={certs.ca}"
    with pytest.raises(StoreConfigError, match="ssl_keyfile"):
        RedisStore(f"rediss://h?ssl_certfile={certs.client_cert}")


# -- redaction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h/0", "redis://h/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        (f"redis://:{PASSWORD}@h/0", "redis://:***@h/0"),
        (
            f"rediss://u:{PASSWORD}@h:1/0?ssl_cert_reqs=none",
            "rediss://u:***@h:1/0?ssl_cert_reqs=none",
        ),
        (
            f"redis+cluster://:{PASSWORD}@a:1,b:2/?shards=4",
            "redis+cluster://:***@a:1,b:2/?shards=4",
        ),
        (
            f"rediss+sentinel://u:{PASSWORD}@s:1/m/2?sentinel_password={SENTINEL_PASSWORD}#x",
            "rediss+sentinel://u:***@s:1/m/2?sentinel_password=***#x",
        ),
        (f"redis://h?SENTINEL_PASSWORD={SENTINEL_PASSWORD}", "redis://h?SENTINEL_PASSWORD=***"),
        (f"redis://:p@ss:{PASSWORD}@h/0", "redis://:***@h/0"),
        (f"redis://:{PASSWORD}#x@h/0", "redis://***@h/0"),
        ("no scheme at all", "no scheme at all"),
    ],
)
def test_redact_hides_every_password_of_every_form(url: str, shown: str) -> None:
    assert redact(url) == shown
