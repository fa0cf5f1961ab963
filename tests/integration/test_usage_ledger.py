"""The usage ledger on SQLite and PostgreSQL: writers on one database (replicas) add into the
same rows, and what a kill -9 loses is bounded by the flush interval."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefixes.errors import InvalidArgument
from prefixes.storage.database import open_engine
from prefixes.storage.schema import migrate
from prefixes.usage.flusher import UsageFlusher
from prefixes.usage.ledger import GroupBy, UsageLedger
from prefixes.usage.meter import UsageMeter
from prefixes.usage.records import Counts, UsageKey

NOW = 1_700_000_000.0  # a fixed hour, so both writers land in the same row


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("database_url"))
    return f"sqlite:///{tmp_path / 'usage.sqlite3'}"


def totals(ledger: UsageLedger) -> dict[str, Counts]:
    page = ledger.report(tenant=None, start=0, end=2**40, group_by=GroupBy.PREFIX, limit=1000)
    return {f"{row.tenant}:{row.model}": row.counts for row in page.rows}


def test_replicas_add_into_the_same_rows(registry_url: str) -> None:
    engines = [open_engine(registry_url) for _ in range(2)]
    migrate(engines[0])
    meters = [UsageMeter(), UsageMeter()]
    flushers = [
        UsageFlusher(m, UsageLedger(e), interval=3600) for m, e in zip(meters, engines, strict=True)
    ]
    for index, meter in enumerate(meters):
        for _ in range(50):
            meter.add("alice", "alice/a", Counts(requests=1, completion_tokens=index + 1), NOW)
        meter.add("bob", "base", Counts(failed_rate_limited=1), NOW)
    for flusher in flushers:
        assert flusher.flush()
        flusher.close()
    found = totals(UsageLedger(engines[0]))
    assert found["alice:alice/a"].requests == 100
    assert found["alice:alice/a"].completion_tokens == 50 * 1 + 50 * 2
    assert found["bob:base"].failed_rate_limited == 2
    for engine in engines:
        engine.dispose()


WRITER = textwrap.dedent(
    """
    import sys, time
    from prefixes.storage.database import open_engine
    from prefixes.usage.flusher import UsageFlusher
    from prefixes.usage.ledger import GroupBy, UsageLedger
    from prefixes.usage.meter import UsageMeter
    from prefixes.usage.records import Counts
    meter = UsageMeter()
    flusher = UsageFlusher(meter, UsageLedger(open_engine(sys.argv[1])), interval=0.05).start()
    meter.add("alice", "flushed", Counts(requests=7), 1_700_000_000.0)
    print("counted", flush=True)
    ledger = UsageLedger(open_engine(sys.argv[1]))
    def written():
        page = ledger.report(tenant=None, start=0, end=2**40, group_by=GroupBy.PREFIX, limit=9)
        return bool(page.rows)
    while not written():  # the flusher's transaction committed
        time.sleep(0.01)
    flusher._stop.set()  # no more flushes: what is gathered next dies with the process
    flusher._thread.join()
    meter.add("alice", "unflushed", Counts(requests=5), 1_700_000_000.0)
    print("ready", flush=True)
    time.sleep(3600)
    """
)


def test_a_kill_9_loses_only_what_was_not_yet_flushed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    engine = open_engine(url)
    migrate(engine)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert writer.stdout is not None
        lines = [writer.stdout.readline().strip(), writer.stdout.readline().strip()]
        assert lines == ["counted", "ready"], lines
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    found = totals(UsageLedger(engine))
    assert found["alice:flushed"].requests == 7  # written before the kill: kept, whole
    assert "alice:unflushed" not in found  # gathered after the last flush: lost
    engine.dispose()


@pytest.mark.parametrize("group_by", list(GroupBy))
def test_pages_never_shift_when_rows_are_added_meanwhile(
    registry_url: str, group_by: GroupBy
) -> None:
    """Paging one row at a time while the flusher adds rows that sort before and after the
    page being read: every row that existed at the start is read exactly once, in order, with
    the base model's refusals (model "") among them, on either database."""
    engine = open_engine(registry_url)
    migrate(engine)
    ledger = UsageLedger(engine)
    hour = int(NOW) // 3600 * 3600
    first = {
        UsageKey(tenant, model, hour + h): Counts(requests=1)
        for tenant in ("bob", "carol", "dave")
        for model in ("", "x/a", "x/b")
        for h in (0, 3600)
    }
    ledger.add(first)
    start, end = hour, hour + 7200
    seen: list[tuple[int, str, str | None]] = []
    cursor = None
    for added in range(1, 100):  # there are 20 rows at most: more pages would be a shift
        page = ledger.report(
            tenant=None, start=start, end=end, group_by=group_by, limit=1, cursor=cursor
        )
        seen += [(row.start, row.tenant, row.model) for row in page.rows]
        # each time a new row sorting first; once a new one among those still to come
        batch = {UsageKey("aaron", f"n/{added}", hour): Counts(requests=1)}
        if added == 1:
            batch[UsageKey("carol", "x/c", hour)] = Counts(requests=1)
        ledger.add(batch)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert cursor is None, seen
    everything = ledger.report(tenant=None, start=start, end=end, group_by=group_by, limit=1000)
    listed = [(row.start, row.tenant, row.model) for row in everything.rows]
    assert seen == sorted(set(seen), key=listed.index)  # once each, in the report's order
    before = {(row.tenant, row.model) for row in everything.rows if row.tenant in ("bob", "dave")}
    assert {(t, m) for _, t, m in seen if t in ("bob", "dave")} == before
    assert ("bob", "") in before and not any(t == "aaron" for _, t, _ in seen)
    assert sum((t, m) == ("carol", "x/c") for _, t, m in seen) == 1
    engine.dispose()


def hour_key(*key: object, group_by: str = "hour") -> str:
    return json.dumps({"group_by": group_by, "after": list(key)})


CRAFTED = {  # the JSON a cursor holds, for a report grouped by hour
    "an older form": json.dumps({"offset": 10}),
    "a bucket beyond 64 bits": hour_key(10**20, "a", "b"),
    "too short": hour_key("a"),
    "a bool for the bucket": hour_key(True, "a", "b"),
    "a number for the tenant": hour_key(1, 2, "b"),
    "a list": "[]",
    "a NUL byte (PostgreSQL's text refuses it)": hour_key(1, "a\x00", "b"),
    "a lone surrogate (no UTF-8 for it)": hour_key(1, "a\ud800", "b"),
    "a tenant longer than its column": hour_key(1, "a" * 65, "b"),
    "another grouping's": hour_key(1, "a", "b", group_by="day"),
    "no grouping": json.dumps({"after": [1, "a", "b"]}),
    "nested past the parser's depth": "[" * 1500,
    "longer than any real cursor": hour_key(1, "a", "b" * 5000),
}


@pytest.mark.parametrize("crafted", list(CRAFTED.values()), ids=list(CRAFTED))
def test_a_crafted_cursor_is_refused_naming_it(registry_url: str, crafted: str) -> None:
    engine = open_engine(registry_url)
    migrate(engine)
    cursor = base64.urlsafe_b64encode(crafted.encode()).decode()
    with pytest.raises(InvalidArgument) as refused:
        UsageLedger(engine).report(
            tenant=None, start=0, end=2**40, group_by=GroupBy.HOUR, limit=5, cursor=cursor
        )
    assert refused.value.field == "cursor"
    engine.dispose()
