"""``lapse sessions list --user NAME`` and ``expire --user NAME [--except
UID]`` straight on a shared store (SQLite, Redis, PostgreSQL: the store's
index of sessions by principal), the principal in ``list`` and ``show``, and
the checks of ``--user``. The command runs in-process through ``main()``."""

from __future__ import annotations

import asyncio
import json

import pytest
from _cli import lapse
from _no_index_store import NoIndexStore
from _principal_views import seed_principals, store_call

from lapse.cli.common import CommandError
from lapse.cli.sources import StoreSource

ANN = [f"ann{i}" + "x" * 21 for i in range(3)]
BOB = "bob0" + "y" * 20
NOBODY = "none" + "z" * 20
WEIRD = "m\u202eallory <b>&"
"""A principal with a right-to-left override and markup in it."""


@pytest.fixture
def seeded(shared_store: str) -> str:
    """A shared store with three sessions of "ann", one of "bob", one of the
    weird principal and one bound to no one."""
    seed_principals(
        shared_store,
        [
            *((uid, 600, "ann") for uid in ANN),
            (BOB, 900, "bob"),
            ("weird" + "w" * 19, 900, WEIRD),
            (NOBODY, 900, None),
        ],
    )
    return shared_store


def test_list_user_shows_that_principals_sessions_latest_first(
    seeded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """list --user ann prints ann's live sessions in the store's order (most
    recently used first), each with the USER column, and 'N of M live
    sessions of 'ann''; --limit cuts the rows, not the count; --json gives
    the rows with their principal and the user."""
    order = [info.uid for info in store_call(seeded, "sessions_of", "ann")]
    assert sorted(order) == sorted(ANN)
    status, out, err = lapse(capsys, "sessions", "list", "--user", "ann", "--store", seeded)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["UID", "AGE", "IDLE", "LEFT", "USER"]
    assert [line.split()[0] for line in lines[1:-1]] == [uid[:8] + "\u2026" for uid in order]
    assert all(line.split()[-1] == "ann" for line in lines[1:-1])
    assert lines[-1].startswith("3 of 3 live sessions of 'ann' in ")
    status, out, _ = lapse(
        capsys, "sessions", "list", "--user", "ann", "--limit", "1", "--full", "--store", seeded
    )
    assert status == 0 and order[0] in out and "1 of 3 live sessions of 'ann'" in out
    status, out, _ = lapse(capsys, "sessions", "list", "--user", "ann", "--json", "--store", seeded)
    listing = json.loads(out)
    assert listing["user"] == "ann" and listing["live"] == 3
    assert [row["uid"] for row in listing["sessions"]] == order
    assert {row["principal"] for row in listing["sessions"]} == {"ann"}
    status, out, _ = lapse(capsys, "sessions", "list", "--user", "carol", "--store", seeded)
    assert status == 0 and "0 of 0 live sessions of 'carol'" in out


def test_list_and_show_give_every_sessions_principal(
    seeded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """list shows each session's principal (- for none), show its line
    'principal:'; a principal with an invisible control of the terminal
    (a right-to-left override) is printed escaped."""
    status, out, _ = lapse(capsys, "sessions", "list", "--full", "--store", seeded)
    assert status == 0
    users = {line.split()[0]: line.split("  ")[-1].strip() for line in out.splitlines()[1:-1]}
    assert users[BOB] == "bob" and users[NOBODY] == "-" and users[ANN[0]] == "ann"
    assert "\u202e" not in out and "m\\u202eallory <b>&" in out
    status, out, _ = lapse(capsys, "sessions", "show", BOB, "--store", seeded)
    assert status == 0 and "principal:   bob" in out
    status, out, _ = lapse(capsys, "sessions", "show", NOBODY, "--json", "--store", seeded)
    assert status == 0 and json.loads(out)["principal"] is None


def test_expire_user_ends_that_principals_sessions(
    seeded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """expire --user ann ends ann's three sessions and no other, printing one
    'expired <short uid>' line each and the count; once more: 'no live
    sessions of 'ann'', still exit 0."""
    status, out, err = lapse(capsys, "sessions", "expire", "--user", "ann", "--store", seeded)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert sorted(lines[:-1]) == sorted(f"expired {uid[:8]}\u2026" for uid in ANN)
    assert lines[-1].startswith("expired 3 sessions of 'ann' in ")
    assert store_call(seeded, "sessions_of", "ann") == []
    assert store_call(seeded, "count") == 3
    status, out, _ = lapse(capsys, "sessions", "expire", "--user", "ann", "--store", seeded)
    assert status == 0 and out.startswith("no live sessions of 'ann' in ")


def test_expire_user_except_keeps_one_and_refuses_a_session_not_live(
    seeded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--except UID (its start, as list shows it) keeps that session; an
    --except that names no live session is exit 1 with one line, and ends
    nothing (the session to keep may be mistyped)."""
    status, out, err = lapse(
        capsys, "sessions", "expire", "--user", "ann", "--except", "nosuchuid", "--store", seeded
    )
    assert status == 1 and out == "" and "--except: no live session 'nosuchuid'" in err
    assert err.count("\n") == 1 and "nothing expired" in err
    assert len(store_call(seeded, "sessions_of", "ann")) == 3
    kept = ANN[1][:8] + "\u2026"
    status, out, _ = lapse(
        capsys, "sessions", "expire", "--user", "ann", "--except", kept, "--store", seeded
    )
    assert status == 0 and "expired 2 sessions of 'ann'" in out and kept not in out
    assert [info.uid for info in store_call(seeded, "sessions_of", "ann")] == [ANN[1]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["list", "--user", ""], "argument --user: a principal is 1 to 256 characters"),
        (["list", "--user", "a" * 300], "a principal is 1 to 256 characters, not 300"),
        (["expire", "--user", "a\x1b[2J"], "a principal has no control characters: 'a\\x1b[2J'"),
        (["list", "--user", "a\udcff"], "lone surrogate"),
        (["expire", "--user", "ann", "--all"], "--all or --user NAME (one of them)"),
        (["expire", "--user", "ann", "u1"], "--all or --user NAME (one of them)"),
        (["expire", "u1", "--except", "u2"], "--except goes with --user"),
        (["expire", "--user", "ann", "--yes"], "--yes goes with --all"),
    ],
)
def test_a_bad_user_option_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--user that no store would take as a principal (empty, too long,
    control characters, not Unicode: bytes the shell gave) is exit 2 with one
    clear line, as check_principal says, before any store is opened; so is
    --user with uids or --all, or --except without --user."""
    status, out, err = lapse(capsys, "sessions", *argv, "--store", "sqlite:///nonexistent.db")
    assert status == 2 and out == ""
    assert message in err and "Traceback" not in err
    assert "no such file" not in err


def test_a_store_without_the_index_is_a_one_line_error() -> None:
    """A store that keeps no index of principals (one written elsewhere):
    list --user and expire --user are a CommandError, exit 1 (a refusal),
    saying the store keeps no such index."""
    source = StoreSource(NoIndexStore())
    for action in (source.sessions_of("ann", 10), source.expire_user("ann", None)):
        with pytest.raises(CommandError, match="keeps no index of sessions by principal") as exc:
            asyncio.run(action)
        assert exc.value.status == 1
