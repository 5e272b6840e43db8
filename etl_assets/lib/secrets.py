"""Passwords never printed: every line the CLI writes passes through `redact`.

Secrets reach messages by many roads: a URL in a setting we refuse, a libpq connection string
DuckDB repeats in its errors, a driver that misreads a password holding an unencoded `@` or `/`
and prints what followed it as a host name or a port. `redact` removes the three shapes
(`user:password@` in a URL, `password=` in a libpq string, and any piece of a password the
environment holds), and `RedactingStream` applies it to everything written to stdout and
stderr, so a library's message or a traceback (`-v`) is covered as well as ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TextIO

MASK = "***"
# password=... in a libpq string: quoted (with \' escapes) or up to the next space.
_LIBPQ_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# scheme://user:password@ : up to the last @ of the word, so an unencoded @ or / in the
# password is masked with the rest of it.
_URL_CREDENTIALS = re.compile(r"([a-z][a-z0-9+.\-]*://)([^\s:@/\"']*):(\S*)@", re.IGNORECASE)
# Variables whose values may hold a password, and the one that is a password.
SECRET_VARS = ("DAGSTER_PG_URL", "DUCKDB_PATH", "CELERY_BROKER_URL")
PASSWORD_VARS = ("PGPASSWORD",)
# Pieces of a password shorter than this are not masked alone (they would mask common words).
_MIN_PIECE = 4


def url_password(url: str) -> str | None:
    """The password in `scheme://user:password@host...`, read up to the last @ (so an
    unencoded @ or / stays part of it), or None."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return None
    credentials = rest.rsplit("@", 1)[0]
    _, colon, password = credentials.partition(":")
    return password if colon and password else None


def known_secrets(env: Mapping[str, str]) -> list[str]:
    """The passwords `env` holds, and each piece of one that a driver could print after
    misreading an unencoded @, / or : in it (longest first)."""
    found: set[str] = set()
    for var in SECRET_VARS:
        value = env.get(var, "")
        password = url_password(value)
        if password:
            found.add(password)
        found.update(m.group(2).strip("'") for m in _LIBPQ_PASSWORD.finditer(value))
    found.update(env[v] for v in PASSWORD_VARS if env.get(v))
    pieces = set()
    for secret in found:
        pieces.update(re.split(r"[@/:?#]", secret))
        for cut in re.finditer(r"[@/:?#]", secret):  # what a driver reads before and after it
            pieces.update((secret[:cut.start()], secret[cut.end():]))
    return sorted((s for s in found | pieces if len(s) >= _MIN_PIECE), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL passwords, libpq passwords and each of `secrets` replaced by ***."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}{m.group(2)}:{MASK}@", text)
    text = _LIBPQ_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}", text)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class RedactingStream:
    """A text stream that redacts each write before passing it on (stdout or stderr)."""

    def __init__(self, stream: TextIO, secrets: Iterable[str]) -> None:
        self._stream = stream
        self._secrets = list(secrets)

    def write(self, text: str) -> int:
        self._stream.write(redact(text, self._secrets))
        return len(text)

    def __getattr__(self, name: str):  # flush, fileno, isatty, encoding, ...
        return getattr(self._stream, name)
