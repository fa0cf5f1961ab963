"""A throwaway PostgreSQL cluster on loopback for tests: Debian's server binaries, initdb into a
temp directory, pg_ctl on a free port, one fresh database per test, removed at the end.

initdb refuses to run as root, so when the tests run as root (CI does) the server runs as the
`postgres` OS user that Debian's package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import psycopg

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_USER = "postgres"
_database_numbers = count()


MISSING = (
    f"PostgreSQL server binaries not found ({BIN_GLOB}/initdb): the registry's PostgreSQL "
    "tests start their own server. Install it with `apt-get install postgresql` (.ci/run does "
    "this in CI)."
)


def find_bin_dir() -> Path | None:
    """The newest installed server's bin directory (the one with initdb), if any."""
    found = [Path(path) for path in glob.glob(BIN_GLOB) if (Path(path) / "initdb").is_file()]
    if not found:
        return None
    return max(found, key=lambda path: int(path.parent.name.split(".")[0]))


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--", *command]
    return command


def _run(command: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(_as_server_user(command), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        server_log = log.read_text()[-4000:] if log is not None and log.exists() else ""
        raise RuntimeError(
            f"{what} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{server_log}"
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    bin_dir: Path
    root: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection:
        # CREATE and DROP DATABASE refuse to run inside a transaction.
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SERVER_USER, dbname="postgres", autocommit=True
        )

    def create_database(self) -> str:
        name = f"registry_{os.getpid()}_{next(_database_numbers)}"
        with self._admin() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self._admin() as connection:  # FORCE: a failed test may leave connections open
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            _run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                  "-w", "stop"], "pg_ctl stop")  # fmt: skip
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> Cluster:
    """initdb and start a server listening on 127.0.0.1 only; the caller stops it."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise RuntimeError(MISSING)
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="prefix-server-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, SERVER_USER)
    cluster = Cluster(bin_dir, root, _free_port())
    try:
        _init(cluster)
        _start(cluster)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


def _init(cluster: Cluster) -> None:
    # trust: only loopback and a socket in a private directory reach this throwaway server.
    _run([str(cluster.bin_dir / "initdb"), "-D", str(cluster.data_dir), "-U", SERVER_USER,
          "--auth=trust", "-E", "UTF8", "--no-sync"], "initdb")  # fmt: skip


def _start(cluster: Cluster) -> None:
    log = cluster.root / "server.log"
    # fsync off: a test database never has to survive a power cut, and fsync is slow here.
    options = (
        f"-p {cluster.port} -k {cluster.root} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c full_page_writes=off"
    )
    _run([str(cluster.bin_dir / "pg_ctl"), "-D", str(cluster.data_dir), "-l", str(log),
          "-o", options, "-w", "-t", "60", "start"], "pg_ctl start", log)  # fmt: skip
