"""The rules of the two service URLs (DATABASE_URL, REDIS_URL), checked when settings load.

The drivers parse these URLs only when they connect, and a malformed one then fails with the
driver's own exception (``int()`` of a port, asyncpg's ``ClientConfigurationError``), far
from the setting that caused it. :class:`~halldyll_ray.config.Settings` calls these checks,
so every entry point (the CLI, ``serve_local``, the Serve app) refuses such a URL the same
way: one line naming the variable. Each check raises ``ValueError`` with a message that never
contains the URL's user name or password.
"""

from __future__ import annotations

import re
import urllib.parse

from halldyll_ray.errors import quoted, redact

POSTGRES_SCHEMES = ("postgresql", "postgres")
REDIS_SCHEMES = ("redis", "rediss", "unix")

#: Query parameters of a PostgreSQL URL that asyncpg reads, with the values it takes (its
#: ``SSLMode``, ``SessionAttribute``, ``SSLNegotiation`` and ``ssl.TLSVersion`` names; libpq's).
_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
POSTGRES_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": (
        "any",
        "primary",
        "standby",
        "prefer-standby",
        "read-write",
        "read-only",
    ),
    "sslnegotiation": ("postgres", "direct"),
    "gsslib": ("gssapi", "sspi"),
    "ssl_min_protocol_version": _TLS_VERSIONS,
    "ssl_max_protocol_version": _TLS_VERSIONS,
}
#: Query parameters of a Redis URL that redis-py takes from a fixed set.
REDIS_CHOICES: dict[str, tuple[str, ...]] = {
    "ssl_cert_reqs": ("none", "optional", "required"),
    "protocol": ("2", "3"),
}
_PORT = re.compile(r"[0-9]{1,5}")
_IPV6 = re.compile(r"\[([^\]]+)\](?::(.*))?")


def _port(text: str, where: str) -> None:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        # Not echoed: in a URL missing its '@' (postgresql://app:secret/db) it is a password.
        raise ValueError(f"{where}: the port is not a number from 1 to 65535")


def _split(url: str, schemes: tuple[str, ...], example: str) -> urllib.parse.SplitResult:
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        raise ValueError(
            f"must start with {', '.join(s + '://' for s in schemes)} (for example {example})"
        )
    if any(ch.isspace() for ch in url):
        raise ValueError("must not contain spaces (percent-encode them: %20)")
    try:
        return urllib.parse.urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL": a '[' without its ']'
        raise ValueError(f"is not a valid URL ({exc})") from None


def _query(parts: urllib.parse.SplitResult) -> dict[str, list[str]]:
    if not parts.query:
        return {}
    try:
        return urllib.parse.parse_qs(parts.query, strict_parsing=True)
    except ValueError:
        raise ValueError(
            "has a malformed query string: it must read ?name=value&name=value"
        ) from None


def _choices(query: dict[str, list[str]], allowed: dict[str, tuple[str, ...]]) -> None:
    for name, values in allowed.items():
        for value in query.get(name, ()):
            if value not in values:
                raise ValueError(f"{name}={quoted(value, 24)} is not one of: {', '.join(values)}")


def check_postgres_url(url: str) -> None:
    """Raise ValueError unless asyncpg can use ``url`` as given: a postgresql:// URL whose
    hosts (one, or several for failover) each have a port of 1 to 65535 if any, and whose
    query parameters asyncpg reads have values it takes."""
    parts = _split(url, POSTGRES_SCHEMES, "postgresql://app@db.example:5432/halldyll")
    hostlist = parts.netloc.rpartition("@")[2]
    hosts = hostlist.split(",") if hostlist else []
    for number, spec in enumerate(hosts, start=1):
        where = f"host {number}" if len(hosts) > 1 else "host"
        spec = urllib.parse.unquote(spec)
        if not spec:
            raise ValueError(f"{where} is empty (hosts are separated by one comma)")
        if spec.startswith("["):
            match = _IPV6.fullmatch(spec)
            if match is None:
                raise ValueError(f"{where}: an IPv6 address is written [address]:port")
            port = match[2]
        elif spec.startswith("/"):
            port = None  # a Unix socket folder
        else:
            port = spec.partition(":")[2] if ":" in spec else None
        if port is not None:
            _port(port, where)
    query = _query(parts)
    ports = [p for value in query.get("port", ()) for p in value.split(",")]
    for port in ports:
        _port(port, "port parameter")
    if len(ports) > 1 and len(hosts) > 1 and len(ports) != len(hosts):
        raise ValueError(f"names {len(ports)} ports for {len(hosts)} hosts")
    _choices(query, POSTGRES_CHOICES)


def check_redis_url(url: str) -> None:
    """Raise ValueError unless redis-py can use ``url`` as given: a redis://, rediss:// or
    unix:// URL with a port of 1 to 65535 if any, a database number (the path, or ``db=``)
    that is a whole number, a socket path for unix://, and query values redis-py takes."""
    from redis.connection import parse_url

    parts = _split(url, REDIS_SCHEMES, "redis://localhost:6379/0")
    scheme = parts.scheme.lower()
    query = _query(parts)
    if scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs the socket's path (unix:///run/redis/redis.sock)")
    else:
        port = parts.netloc.rpartition("@")[2]
        port = port.rpartition("]")[2] if port.startswith("[") else port
        if ":" in port:
            _port(port.rpartition(":")[2], "host")
        db = urllib.parse.unquote(parts.path).strip("/")
        if db and not db.isdigit():
            raise ValueError(
                f"the database (the path) must be a number such as /0, not {quoted(db, 24)}"
            )
    for value in query.get("db", ()):
        if not value.isdigit():
            raise ValueError(f"db={quoted(value, 24)} is not a database number")
    _choices(query, REDIS_CHOICES)
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # a query value of the wrong type
        raise ValueError(redact(str(exc), url)) from None
