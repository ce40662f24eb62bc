"""``lapse sessions list|show|expire|stats`` (``list --user`` and ``expire
--user`` by principal): written once, over a
:class:`~lapse.cli.sources.SessionSource` (a shared store with ``--store``,
a server's live view with ``--server``).

Exit status: 0 on success, 2 for a bad command line or store URL (and for
``memory:`` with ``--store``), 1 when the store or the server cannot be
reached or refuses, when a named session is not live, or when ``expire
--all`` leaves sessions live.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable

from lapse import settings
from lapse.cli.common import EXIT_FAILED, CommandError, _duration, _say, _user_shown, _when
from lapse.cli.liveview_client import LiveViewClient, server_base
from lapse.cli.parser import SCAN_BATCH
from lapse.cli.sources import Row, ServerSource, SessionSource, Stats, StoreSource, open_store

__all__ = ["run_sessions"]

EXPIRE_PASSES = 5
"""``expire --all`` passes at most: sessions touched or created during one pass
may be left out of it (see the stores' ``scan``), so it scans again while the
previous pass found any."""


def _age(value: float | None) -> str:
    return "?" if value is None else _duration(value)


async def _list(source: SessionSource, args: argparse.Namespace) -> int:
    if args.full and source.row_ids:
        raise CommandError("--full goes with --store: with --server, rows have whole IDs, no uids")
    from lapse.sessions import short_uid

    if args.user is not None:
        shown, total = await source.sessions_of(args.user, args.limit)
    else:
        total, shown = await _page_through(source, args.limit)
    if args.json:
        # One document (json.load reads it), not JSON Lines: the live count
        # belongs to the listing, and a reader cannot tell a cut stream.
        rows = [row.json for row in shown]
        listing = {source.kind: source.url, "live": total, "sessions": rows}
        if args.user is not None:
            listing["user"] = args.user
        print(json.dumps(listing, ensure_ascii=False))
        return 0
    uids = [row.uid if args.full or row.id is not None else short_uid(row.uid) for row in shown]
    width = max([len(uid) for uid in uids] + [3]) if args.full else 9
    ids = max([len(str(row.id)) for row in shown] + [2])
    head = f"{'ID':<{ids}}  " if source.row_ids else ""
    print(f"{head}{'UID':<{width}}  {'AGE':>7}  {'IDLE':>7}  {'LEFT':>7}  USER")
    for row, uid in zip(shown, uids, strict=True):
        first = f"{row.id!s:<{ids}}  " if source.row_ids else ""
        age, idle, left = _age(row.age), _duration(row.idle), _duration(row.left)
        user = _user_shown(row.principal)
        print(f"{first}{uid:<{width}}  {age:>7}  {idle:>7}  {left:>7}  {user}")
    more = "; --limit N for more" if total > len(shown) else ""
    whose = "" if args.user is None else f" of {_user_shown(args.user)!r}"
    print(f"{len(shown)} of {total} live sessions{whose} {source.where}{more}")
    return 0


async def _page_through(source: SessionSource, limit: int) -> tuple[int, list[Row]]:
    """The live count and the first ``limit`` live sessions."""
    total = await source.count()
    shown: list[Row] = []
    cursor: str | None = None
    while len(shown) < limit:
        wanted = limit - len(shown)
        page, following = await source.page(cursor, min(SCAN_BATCH, wanted))
        shown += page[:wanted]
        if following is None or (not page and following == cursor):
            break
        cursor = following
    return total, shown


async def _show(source: SessionSource, args: argparse.Namespace) -> int:
    row = await source.find(args.uid)
    if row is None:
        raise CommandError(source.not_live(args.uid), EXIT_FAILED)
    if args.json:
        print(json.dumps(row.json, ensure_ascii=False))
        return 0
    now = row.now
    if row.id is not None:
        print(f"id:          {row.id}")
    note = "" if row.id is None else " (the live view gives only its start)"
    print(f"uid:         {row.uid}{note}")
    print(f"principal:   {_user_shown(row.principal, 300)}")
    created = "unknown"
    if row.age is not None:
        created = f"{_when(now - row.age)} ({_duration(row.age)} ago)"
    print(f"created:     {created}")
    print(f"last access: {_when(now - row.idle)} ({_duration(row.idle)} ago)")
    print(f"ends:        {_when(now + row.left)} (in {_duration(row.left)} if untouched)")
    if row.data is None:
        print("data:        (not exposed by the live view)")
        return 0
    print("data:" + ("" if row.data else "        {}"))
    for key, value in sorted(row.data.items()):
        print(f"  {key}: {json.dumps(value, ensure_ascii=False)}")
    return 0


class _Progress:
    """``count/total (percent), rate`` on stderr, redrawn in place with ``\\r``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def show(self, final: bool = False) -> None:
        total = max(self.total, self.done)
        percent = 100 * self.done // total if total else 100
        line = f"\rexpired {self.done}/{total} ({percent}%), {self.rate():.0f}/s"
        print(line + ("\n" if final else ""), end="", file=sys.stderr, flush=True)


def _confirm(total: int, url: str) -> bool:
    print(
        f"End all {total} live sessions in {url}? Their users are logged out. [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        print(file=sys.stderr)  # (end of input: finish the prompt's line)
    return answer.strip().lower() in ("y", "yes")


async def _expire_all(source: SessionSource, args: argparse.Namespace) -> int:
    """Confirm, then page through and end each page together, with a progress
    line; pass again while a pass found sessions (users active meanwhile, or
    a worker that could not end one); then count: any left is exit 1."""
    total = await source.count()
    if total == 0:
        print(f"no live sessions {source.where}")
        return 0
    if not args.yes and not _confirm(total, source.url):
        _say("nothing expired")
        return EXIT_FAILED
    progress = _Progress(total)
    progress.show()
    left = total
    for _ in range(EXPIRE_PASSES):
        found = 0
        cursor: str | None = None
        while True:
            page, cursor = await source.page(cursor, args.batch)
            found += len(page)
            progress.done += sum(await source.expire([row.name for row in page]))
            if page:
                progress.show()
            if cursor is None:
                break
        left = await source.count()
        if not found or not left:
            break
        progress.total = progress.done + left
    progress.show(final=True)
    print(f"expired {progress.done} sessions {source.where}")
    if left:
        _say(
            f"error: {left} sessions are still live {source.where} after {EXPIRE_PASSES} "
            "passes (sessions made meanwhile, or ones the server could not end); run it again"
        )
        return EXIT_FAILED
    return 0


async def _expire_user(source: SessionSource, args: argparse.Namespace) -> int:
    """Log one principal out everywhere (but --except's session): one line
    per session ended, then how many."""
    ended = await source.expire_user(args.user, args.keep)
    whose = f"of {_user_shown(args.user)!r} {source.where}"
    for name in ended:
        print(f"expired {name}")
    if not ended:
        print(f"no live sessions {whose}" + (" but the one kept" if args.keep else ""))
    else:
        print(f"expired {len(ended)} sessions {whose}")
    return 0


async def _expire(source: SessionSource, args: argparse.Namespace) -> int:
    if args.all:
        return await _expire_all(source, args)
    if args.user is not None:
        return await _expire_user(source, args)
    status = 0
    for given in args.uids:
        try:
            name = await source.resolve(given)
        except CommandError as exc:  # ambiguous: say so, go on with the others
            _say(f"error: {exc}")
            status = EXIT_FAILED
            continue
        if name is not None and (await source.expire([name]))[0]:
            print(f"expired {given}")
        else:
            _say(source.not_live(given))
            status = EXIT_FAILED
    return status


def _print_activity(activity: dict[str, object]) -> None:
    """A live view's counts: since start, and per minute over the last ten."""
    minutes = activity.get("minutes")
    minutes = minutes if isinstance(minutes, dict) else {}
    ended = activity.get("ended")
    ended = ended if isinstance(ended, dict) else {}
    created_by_minute = list(minutes.get("created") or [])
    ended_by_minute = list(minutes.get("ended") or [])
    causes = ", ".join(f"{k} {v}" for k, v in sorted(ended.items()))
    print(
        f"since start:   {activity.get('created', 0)} created, "
        f"{sum(ended.values())} ended" + (f" ({causes})" if causes else "")
    )
    print(
        f"last hour:     {sum(created_by_minute)} created, {sum(ended_by_minute)} ended; "
        "per minute, latest last:"
    )
    recent = list(zip(created_by_minute, ended_by_minute, strict=False))[-10:]
    for back, (c, e) in zip(range(len(recent) - 1, -1, -1), recent, strict=True):
        label = "this minute" if back == 0 else f"{back} min ago"
        print(f"  {label:>11}  created {c:>6}  ended {e:>6}")


async def _stats(source: SessionSource, args: argparse.Namespace) -> int:
    stats: Stats = await source.stats(args.horizon, args.buckets)
    counts = stats.counts
    width = stats.horizon / max(1, len(counts))
    if args.json:
        report = {
            **stats.identity,
            "now": stats.now,
            "live": stats.live,
            "horizon": stats.horizon,
            "bucket_seconds": width,
            "ending": counts,
            **stats.extra,
        }
        print(json.dumps(report))
        return 0
    for key, value in stats.identity.items():
        print(f"{key + ':':<15}{value}")
    print(f"live sessions: {stats.live}")
    if stats.activity is not None:
        _print_activity(stats.activity)
    print(f"ending in the next {_duration(stats.horizon)} ({_duration(width)} slices):")
    top = max(counts) if counts else 0
    label = max([len(_duration((i + 1) * width)) for i in range(len(counts))] + [1])
    for i, n in enumerate(counts):
        bar = "#" * (0 if top == 0 else max(1 if n else 0, round(40 * n / top)))
        start, end = _duration(i * width), _duration((i + 1) * width)
        print(f"  {start:>{label}} - {end:>{label}}  {n:>8}  {bar}")
    print(f"  later: {stats.live - sum(counts)}")
    return 0


_COMMANDS: dict[str, Callable[[SessionSource, argparse.Namespace], Awaitable[int]]] = {
    "list": _list,
    "show": _show,
    "expire": _expire,
    "stats": _stats,
}


def _source(args: argparse.Namespace) -> SessionSource:
    """The source the command line names (nothing contacted yet)."""
    if args.server is not None:
        if args.store is not None:
            raise CommandError(
                "--store and --server are mutually exclusive: read a shared store directly "
                "(--store) or go through a server's live view (--server)"
            )
        base = server_base(args.server)
        token = args.token if args.token is not None else settings.LIVEVIEW_TOKEN.get() or None
        return ServerSource(LiveViewClient(base, token))
    if args.token is not None:
        raise CommandError("--token goes with --server (a store URL carries its own access)")
    return StoreSource(open_store(args.store))


def run_sessions(args: argparse.Namespace) -> int:
    """Run ``lapse sessions ACTION``; its exit status."""
    from lapse.sessions.store import StoreUnavailable

    if args.action == "migrate":
        from lapse.cli.migrate import run_migrate

        return run_migrate(args)
    if args.action == "expire":
        if [bool(args.all), bool(args.uids), args.user is not None].count(True) != 1:
            raise CommandError("expire takes session uids, --all or --user NAME (one of them)")
        if args.yes and not args.all:
            raise CommandError("--yes goes with --all")
        if args.keep is not None and args.user is None:
            raise CommandError("--except goes with --user")
    source = _source(args)
    command = _COMMANDS[args.action]

    async def main() -> int:
        try:
            return await command(source, args)
        finally:
            with contextlib.suppress(Exception):
                await source.aclose()

    try:
        return asyncio.run(main())
    except StoreUnavailable as exc:
        raise CommandError(f"cannot reach the session store: {exc}", EXIT_FAILED) from None
