"""Tables and numbered migrations.

`schema_version` holds one row: how many entries of MIGRATIONS have run. Opening a database runs
the missing ones in order, each in its own transaction with its version bump, so a crash leaves
the schema at a whole version. A migration, once released, never changes: a new schema is a new
function appended to MIGRATIONS. A database newer than the code is refused, not guessed at.

Every step runs in a `write_transaction`, under the database's write lock (PostgreSQL: the
advisory lock), so replicas starting together on one database migrate once: the first creates
and fills `schema_version`, the others wait, then find the work done.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
    select,
    text,
    update,
)

from prefixes.storage.database import write_transaction


def _v1_tables() -> MetaData:
    """The schema of version 1. Later versions build on it (`_v2_tables`); when a migration
    changes one of these tables, the current definition gets its own code and this stays."""
    metadata = MetaData()
    Table(
        "tenants",
        metadata,
        Column("name", String(64), primary_key=True),
        # NULL means the registry's default, so changing a default reaches existing tenants.
        Column("max_prefixes", Integer),
        Column("max_bytes", BigInteger),
        Column("max_virtual_tokens", Integer),
        Column("created_at", Float, nullable=False),
    )
    Table(
        "api_keys",
        metadata,
        Column("key_id", String(32), primary_key=True),  # public, shown in listings
        Column("tenant", String(64), ForeignKey("tenants.name"), nullable=False, index=True),
        Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex of the key
        Column("created_at", Float, nullable=False),
        Column("revoked_at", Float),
    )
    prefixes = Table(
        "prefixes",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("owner", String(64), ForeignKey("tenants.name"), nullable=False),
        Column("name", String(64), nullable=False),
        Column("version", Integer, nullable=False),
        Column("kind", String(32), nullable=False),
        Column("num_virtual_tokens", Integer, nullable=False),
        Column("bytes", BigInteger, nullable=False),  # size of the stored file
        Column("sha256", String(64), nullable=False, index=True),  # its content address
        Column("model_fingerprint", String(64), nullable=False),
        Column("visibility", String(16), nullable=False),
        Column("description", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        # Set on delete or when a newer version replaces this one; the row stays as a tombstone
        # so version numbers keep rising even after a delete and a new upload.
        Column("retired_at", Float),
        UniqueConstraint("owner", "name", "version"),
    )
    live = prefixes.c.retired_at.is_(None)
    # At most one live version per name, enforced by the database even across replicas.
    Index(
        "ix_prefixes_live_name",
        prefixes.c.owner,
        prefixes.c.name,
        unique=True,
        sqlite_where=live,
        postgresql_where=live,
    )
    Index(
        "ix_prefixes_live_visibility",
        prefixes.c.visibility,
        prefixes.c.owner,
        prefixes.c.name,
        sqlite_where=live,
        postgresql_where=live,
    )
    return metadata


def _v1_create(connection: Connection) -> None:
    _v1_tables().create_all(connection)


_V2_NEW = ("training_files", "tuning_jobs", "tuning_events")


def _v2_tables() -> MetaData:
    """Version 2: version 1 and fine-tuning (training files, jobs, their events)."""
    metadata = _v1_tables()
    Table(
        "training_files",
        metadata,
        # The order of creation, for listings and cursors: ids are random.
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("id", String(40), nullable=False, unique=True),
        Column("owner", String(64), ForeignKey("tenants.name"), nullable=False),
        Column("filename", String(255), nullable=False),
        Column("purpose", String(32), nullable=False),
        Column("bytes", BigInteger, nullable=False),
        Column("num_examples", Integer, nullable=False),
        # In the database, not the blob store: a file and its row commit or vanish together,
        # and every replica on the database sees it. Bounded by --max-training-file-bytes.
        Column("content", LargeBinary, nullable=False),
        Column("created_at", Float, nullable=False),
        Index("ix_training_files_owner", "owner", "seq"),
    )
    Table(
        "tuning_jobs",
        metadata,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("id", String(40), nullable=False, unique=True),
        Column("owner", String(64), ForeignKey("tenants.name"), nullable=False),
        Column("model", String(256), nullable=False),  # the base model's id or a prefix ref
        Column("training_file", String(40), nullable=False),
        Column("validation_file", String(40)),
        Column("method", String(32), nullable=False),
        Column("num_virtual_tokens", Integer, nullable=False),
        Column("n_epochs", Integer, nullable=False),
        Column("batch_size", Integer, nullable=False),
        Column("learning_rate_multiplier", Float, nullable=False),
        Column("suffix", String(64), nullable=False),  # the name of the prefix it registers
        Column("seed", BigInteger, nullable=False),
        Column("status", String(24), nullable=False),
        Column("error_code", String(64)),
        Column("error_message", Text),
        Column("error_param", String(64)),
        Column("fine_tuned_model", String(160)),
        Column("trained_tokens", BigInteger),
        Column("created_at", Float, nullable=False),
        Column("started_at", Float),
        Column("finished_at", Float),
        Index("ix_tuning_jobs_owner", "owner", "seq"),
        Index("ix_tuning_jobs_status", "status", "seq"),
    )
    Table(
        "tuning_events",
        metadata,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(40), ForeignKey("tuning_jobs.id"), nullable=False),
        Column("created_at", Float, nullable=False),
        Column("level", String(8), nullable=False),
        Column("type", String(16), nullable=False),
        Column("message", Text, nullable=False),
        Column("data", Text),  # JSON
        Index("ix_tuning_events_job", "job_id", "seq"),
    )
    return metadata


def _v2_create(connection: Connection) -> None:
    metadata = _v2_tables()
    metadata.create_all(connection, tables=[metadata.tables[name] for name in _V2_NEW])


def _v3_tables() -> MetaData:
    """Version 3: version 2 and the files waiting out their grace period before deletion
    (replicas sharing one store may still be loading them; prefixes/storage/deletions.py)."""
    metadata = _v2_tables()
    Table(
        "file_deletions",
        metadata,
        Column("sha256", String(64), primary_key=True),
        Column("due_at", Float, nullable=False, index=True),
    )
    return metadata


def _v3_create(connection: Connection) -> None:
    metadata = _v3_tables()
    metadata.tables["file_deletions"].create(connection)


def _v4_tables() -> MetaData:
    """Version 4: version 3 and stored prompt ensembles."""
    metadata = _v3_tables()
    Table(
        "ensembles",
        metadata,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("owner", String(64), ForeignKey("tenants.name"), nullable=False),
        Column("name", String(64), nullable=False),
        Column("method", String(8), nullable=False),  # "vote" | "mean"
        Column("members", Text, nullable=False),  # JSON: prefix references, "owner/name"
        Column("visibility", String(16), nullable=False),
        Column("description", Text, nullable=False),
        Column("created_at", Float, nullable=False),
        UniqueConstraint("owner", "name"),
    )
    return metadata


def _v4_create(connection: Connection) -> None:
    _v4_tables().tables["ensembles"].create(connection)


def _v5_tables() -> MetaData:
    """Version 5: version 4, and each prefix version names the file of its own parameters
    (as uploaded or trained) beside its compiled KV. NULL: a version stored before version 5,
    whose parameters were never kept (docs/registry.md says what its export is)."""
    metadata = _v4_tables()
    Table(
        "prefixes",
        metadata,
        Column("parameters_sha256", String(64), index=True),
        extend_existing=True,
    )
    return metadata


def _v5_prefix_parameters(connection: Connection) -> None:
    # ADD COLUMN of a nullable column: the same statement on SQLite and PostgreSQL, and every
    # existing row keeps its values (its `bytes` stays the size of its one file).
    connection.execute(text("ALTER TABLE prefixes ADD COLUMN parameters_sha256 VARCHAR(64)"))
    for index in _v5_tables().tables["prefixes"].indexes:
        if index.name == "ix_prefixes_parameters_sha256":
            index.create(connection)


def _v6_tables() -> MetaData:
    """Version 6: version 5, and fine-tuning jobs that survive their server. A running job
    holds a lease (`lease_owner`, the runner training it, and `lease_expires_at`, renewed by its
    heartbeat): a job whose lease expired is taken over by another runner.
    `tuning_checkpoints`: the last checkpoints of each job, their tensors in a file of the store
    (prefixes/storage/checkpoint_files.py), the rest here."""
    metadata = _v5_tables()
    Table(
        "tuning_jobs",
        metadata,
        Column("lease_owner", String(64)),
        Column("lease_expires_at", Float),  # NULL (jobs from before version 6): expired
        extend_existing=True,
    )
    Table(
        "tuning_checkpoints",
        metadata,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("job_id", String(40), ForeignKey("tuning_jobs.id"), nullable=False),
        Column("step", Integer, nullable=False),  # optimiser steps taken
        Column("created_at", Float, nullable=False),
        Column("metrics", Text, nullable=False),  # JSON: the step's metrics event
        Column("state", Text, nullable=False),  # JSON: where training resumes (step, epoch...)
        Column("sha256", String(64), nullable=False),  # the tensors' file, by content
        Column("bytes", BigInteger, nullable=False),
        Index("ix_tuning_checkpoints_job", "job_id", "seq"),
    )
    return metadata


_V7_TENANT_COLUMNS = ("requests_per_minute", "tokens_per_minute")


def _v7_tables() -> MetaData:
    """Version 7: version 6, rate-limit overrides on tenants, and usage per tenant, model and
    hour (prefixes/usage)."""
    metadata = _v6_tables()
    metadata.remove(metadata.tables["tenants"])
    Table(
        "tenants",
        metadata,
        Column("name", String(64), primary_key=True),
        Column("max_prefixes", Integer),
        Column("max_bytes", BigInteger),
        Column("max_virtual_tokens", Integer),
        Column("created_at", Float, nullable=False),
        # NULL: the server's default (--requests-per-minute, --tokens-per-minute).
        Column("requests_per_minute", BigInteger),
        Column("tokens_per_minute", BigInteger),
        extend_existing=True,
    )
    Table(
        "usage",
        metadata,
        Column("tenant", String(64), primary_key=True),
        # What ran: a prefix or stored ensemble reference, or the base model's id.
        Column("model", String(256), primary_key=True),
        Column("hour", BigInteger, primary_key=True),  # Unix seconds at the hour's start, UTC
        *(Column(name, BigInteger, nullable=False, default=0) for name in USAGE_COUNTS),
        Index("ix_usage_hour", "hour"),
    )
    return metadata


_V6_JOB_COLUMNS = ("lease_owner", "lease_expires_at")


def _v6_job_leases_and_checkpoints(connection: Connection) -> None:
    metadata = _v6_tables()
    jobs = metadata.tables["tuning_jobs"]
    for name in _V6_JOB_COLUMNS:
        column = jobs.c[name]
        kind = column.type.compile(dialect=connection.dialect)
        connection.exec_driver_sql(f"ALTER TABLE tuning_jobs ADD COLUMN {name} {kind}")
    metadata.tables["tuning_checkpoints"].create(connection)


# The largest value a `seq` (an Integer key) can hold on every database: PostgreSQL's integer
# is 32 bits. A larger number in an id names no row, and binding it would fail in the driver.
MAX_SEQ = 2**31 - 1
# The largest value a BigInteger column holds (a signed 64-bit integer), as either database binds.
MAX_BIGINT = 2**63 - 1


def parse_seq(number: str) -> int | None:
    """The seq an id's number names, or None: ASCII digits only (str.isdigit takes "²"), within
    MAX_SEQ."""
    if not (number.isascii() and number.isdigit()) or len(number) > len(str(MAX_SEQ)):
        return None
    seq = int(number)
    return seq if seq <= MAX_SEQ else None


# The counters of a usage row, in the order the API reports them (prefixes/usage/records.py).
USAGE_COUNTS = (
    "requests",
    "rows",
    "prompt_tokens",
    "completion_tokens",
    "virtual_tokens",
    "tuning_tokens",
    "failed_invalid",
    "failed_rate_limited",
    "failed_overloaded",
    "failed_error",
    "cancelled",
)


def _v7_create(connection: Connection) -> None:
    for name in _V7_TENANT_COLUMNS:
        connection.execute(text(f"ALTER TABLE tenants ADD COLUMN {name} BIGINT"))
    _v7_tables().tables["usage"].create(connection)


MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1_create,
    _v2_create,
    _v3_create,
    _v4_create,
    _v5_prefix_parameters,
    _v6_job_leases_and_checkpoints,
    _v7_create,
]
SCHEMA_VERSION = len(MIGRATIONS)

metadata = _v7_tables()
tenants = metadata.tables["tenants"]
api_keys = metadata.tables["api_keys"]
prefixes = metadata.tables["prefixes"]
training_files = metadata.tables["training_files"]
tuning_jobs = metadata.tables["tuning_jobs"]
tuning_events = metadata.tables["tuning_events"]
file_deletions = metadata.tables["file_deletions"]
ensembles = metadata.tables["ensembles"]
tuning_checkpoints = metadata.tables["tuning_checkpoints"]
usage = metadata.tables["usage"]

_version_metadata = MetaData()
schema_version = Table(
    "schema_version", _version_metadata, Column("version", Integer, nullable=False)
)


def migrate(engine: Engine) -> int:
    """Bring the database to SCHEMA_VERSION; return the version it was at before."""
    with write_transaction(engine) as connection:
        schema_version.create(connection, checkfirst=True)
        found = connection.execute(select(func.max(schema_version.c.version))).scalar()
        if found is None:
            connection.execute(insert(schema_version).values(version=0))
            found = 0
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"registry database: schema version {found} is newer than this code's "
            f"({SCHEMA_VERSION}); upgrade prefix-server"
        )
    for number in range(found + 1, SCHEMA_VERSION + 1):
        with write_transaction(engine) as connection:
            current = connection.execute(select(schema_version.c.version)).scalar_one()
            if current >= number:  # another process migrated meanwhile
                continue
            MIGRATIONS[number - 1](connection)
            connection.execute(update(schema_version).values(version=number))
    return found
