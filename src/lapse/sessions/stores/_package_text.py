"""The stores' SQL and Lua, read from package data (files next to the code).

Both languages comment with ``--``. Each file is read once, when the store's
module is imported, with :mod:`importlib.resources`, so it is found in a
wheel, a zip or a source checkout alike. Reading a file:

- a line ``-- include: NAME`` is replaced by the text of the file ``NAME`` of
  the same package, read the same way (includes do not nest);
- every other line whose first non-blank characters are ``--`` is a comment
  for the reader and is left out: what runs is the code alone (so the Redis
  scripts, and their SHA1s, do not change when their comments do).

:func:`read_statements` reads a file of named statements instead: a line
``-- name: NAME`` starts a statement, which runs to the next one; its lines
are joined by spaces and its final ``;`` dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib.resources import files

__all__ = ["read_source", "read_statements"]

_INCLUDE = re.compile(r"--\s*include:\s*(\S+)")
_NAME = re.compile(r"--\s*name:\s*([A-Za-z_]\w*)")


def _read(package: str, name: str) -> str:
    return files(package).joinpath(name).read_text(encoding="utf-8")


def _code_lines(package: str, name: str, nested: bool) -> Iterator[str]:
    for line in _read(package, name).splitlines(keepends=True):
        stripped = line.strip()
        include = _INCLUDE.fullmatch(stripped)
        if include is not None:
            if nested:
                raise ValueError(f"{package}: {name} includes {include.group(1)}: no nesting")
            yield from _code_lines(package, include.group(1), nested=True)
        elif not stripped.startswith("--"):
            yield line


def read_source(package: str, name: str) -> str:
    """The code of the file ``name`` of ``package``: its includes expanded,
    its comment lines left out."""
    return "".join(_code_lines(package, name, nested=False))


def read_statements(package: str, name: str) -> dict[str, str]:
    """The statements of the file ``name`` of ``package``, by name; a
    :class:`ValueError` for text before the first name, a name given twice,
    or a name with no statement."""
    statements: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in _read(package, name).splitlines():
        stripped = line.strip()
        named = _NAME.fullmatch(stripped)
        if named is not None:
            if named.group(1) in statements:
                raise ValueError(f"{package}: {name}: {named.group(1)} is named twice")
            current = statements[named.group(1)] = []
        elif not stripped or stripped.startswith("--"):
            continue
        elif current is None:
            raise ValueError(f"{package}: {name}: a statement without a -- name: line")
        else:
            current.append(stripped)
    joined = {key: " ".join(lines).removesuffix(";").rstrip() for key, lines in statements.items()}
    empty = [key for key, text in joined.items() if not text]
    if empty:
        raise ValueError(f"{package}: {name}: no statement under {', '.join(empty)}")
    return joined
