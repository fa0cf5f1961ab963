"""The usage ledger on SQLite and PostgreSQL: writers on one database (replicas) add into the
same rows, and what a kill -9 loses is bounded by the flush interval."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefixes.storage.database import open_engine
from prefixes.storage.schema import migrate
from prefixes.usage.flusher import UsageFlusher
from prefixes.usage.ledger import GroupBy, UsageLedger
from prefixes.usage.meter import UsageMeter
from prefixes.usage.records import Counts

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
