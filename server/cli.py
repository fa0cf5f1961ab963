"""The `prefix-server` command: serve, tenant (create, show, quotas, keys), upload, usage,
generate, train."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, ValidationError

DEFAULT_VIRTUAL_TOKENS = 16  # `train` without --init-from or --virtual-tokens

if TYPE_CHECKING:
    from prefixes.catalog.catalog import Catalog
    from server.config import Settings

# Help and the command being run build their flags; the others only their names. Settings and
# the quota limits import the engine (torch): `prefix-server upload` needs neither, and starts
# in a fraction of the time without them.
HELP = ("-h", "--help")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] not in HELP else None
    parser = argparse.ArgumentParser(prog="prefix-server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    if chosen == "serve":
        add_settings_flags(serve)
    serve.set_defaults(run=run_serve)

    tenant = commands.add_parser("tenant", help="manage tenants offline")
    tenant_commands = tenant.add_subparsers(dest="tenant_command", required=True)
    create = tenant_commands.add_parser("create", help="create a tenant; prints its API key once")
    create.add_argument("name")
    add_catalog_flags(create)
    create.set_defaults(run=run_tenant_create)
    show = tenant_commands.add_parser("show", help="a tenant's quotas and usage")
    show.add_argument("name")
    add_catalog_flags(show)
    show.set_defaults(run=run_tenant_show)
    quotas = tenant_commands.add_parser(
        "quotas", help="set some of a tenant's quotas (the others stay), then show the tenant"
    )
    quotas.add_argument("name")
    for quota, limit in quota_limits(chosen == "tenant").items():
        quotas.add_argument(
            "--" + quota.replace("_", "-"),
            type=quota_value(limit),
            metavar="N|default",
            help=f"0 to {limit}, or 'default' to follow the server's default again",
        )
    add_catalog_flags(quotas)
    quotas.set_defaults(run=run_tenant_quotas)
    keys = tenant_commands.add_parser("keys", help="a tenant's keys: ids, creation, revoked")
    keys.add_argument("name")
    add_catalog_flags(keys)
    keys.set_defaults(run=run_tenant_keys)
    issue = tenant_commands.add_parser("issue-key", help="a new API key, printed once")
    issue.add_argument("name")
    add_catalog_flags(issue)
    issue.set_defaults(run=run_tenant_issue_key)
    revoke = tenant_commands.add_parser("revoke-key", help="revoke a key at once, by its id")
    revoke.add_argument("name")
    revoke.add_argument("key_id")
    add_catalog_flags(revoke)
    revoke.set_defaults(run=run_tenant_revoke_key)

    upload = commands.add_parser("upload", help="upload a PEFT adapter folder or native file")
    upload.add_argument("path", type=Path)
    upload.add_argument("--name", required=True)
    add_server_flags(upload)
    upload.add_argument(
        "--visibility",
        choices=["private", "public"],
        help="default: private for a new prefix, unchanged for a new version (--overwrite)",
    )
    upload.add_argument("--description", default="")
    upload.add_argument("--overwrite", action="store_true")
    upload.set_defaults(run=run_upload)

    download = commands.add_parser(
        "download", help="export a prefix as a PEFT adapter folder (PeftModel.from_pretrained)"
    )
    download.add_argument("ref", help="owner/name")
    download.add_argument("--out", type=Path, required=True, help="the folder to write")
    download.add_argument("--version", type=int, help="default: the current version")
    download.add_argument(
        "--url",
        default=os.environ.get("PREFIX_SERVER_URL", "http://127.0.0.1:8000"),
        help="the server (default: PREFIX_SERVER_URL, else http://127.0.0.1:8000)",
    )
    download.add_argument("--api-key", default=os.environ.get("PREFIX_SERVER_API_KEY"))
    download.set_defaults(run=run_download)
    usage = commands.add_parser(
        "usage", help="what was used, per tenant and model (GET /v1/usage): a table or CSV"
    )
    add_server_flags(usage)
    usage.add_argument(
        "--start", type=when, default=0, help="unix seconds or an ISO date/time, UTC if no zone"
    )
    usage.add_argument("--end", type=when, help="unix seconds or an ISO date/time (default: now)")
    usage.add_argument("--group-by", choices=["prefix", "day", "hour"], default="prefix")
    usage.add_argument("--tenant", help="one tenant (the admin key sees every tenant without it)")
    usage.add_argument("--csv", action="store_true", help="CSV, as GET /v1/usage?format=csv")
    usage.set_defaults(run=run_usage)

    generate = commands.add_parser("generate", help="generate offline, optionally with a prefix")
    generate.add_argument("prompt")
    generate.add_argument("--model", help="local folder or cached hub name (default: SmolLM2)")
    generate.add_argument("--data-dir", type=Path, default=Path("data"))
    generate.add_argument("--prefix", type=Path, help="PEFT adapter folder or native .safetensors")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int)
    generate.set_defaults(run=run_generate)

    train = commands.add_parser("train", help="train a prefix with PEFT on the served model")
    train.add_argument("data", type=Path, help='JSON lines: {"prompt", "completion"} or {"text"}')
    train.add_argument("--kind", choices=["prefix", "prompt"], default="prefix")
    train.add_argument(
        "--virtual-tokens",
        type=int,
        help=f"default: the --init-from prefix's length, else {DEFAULT_VIRTUAL_TOKENS}",
    )
    train.add_argument("--out", type=Path, required=True, help="folder for the PEFT adapter")
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--lr", type=float, default=3e-2)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--init-from",
        help="start from a prefix: an adapter folder, a native file, or owner/name in --data-dir",
    )
    train.add_argument("--model", help="local folder or cached hub name (default: SmolLM2)")
    train.add_argument("--data-dir", type=Path, default=Path("data"))
    train.set_defaults(run=run_train)

    args = parser.parse_args(argv)
    return int(args.run(args))


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """--url and --api-key of a command that calls a running server."""
    parser.add_argument(
        "--url",
        default=os.environ.get("PREFIX_SERVER_URL", "http://127.0.0.1:8000"),
        help="the server (default: PREFIX_SERVER_URL, else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PREFIX_SERVER_API_KEY"),
        help="a tenant's key, or the admin key (default: PREFIX_SERVER_API_KEY)",
    )


def when(text: str) -> int:
    """Unix seconds, or an ISO 8601 date or date and time (UTC unless it names a zone)."""
    from datetime import UTC, datetime

    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected unix seconds or an ISO date/time such as 2026-12-01T09:00, found {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0, int(moment.timestamp()))


def quota_limits(needed: bool) -> dict[str, int]:
    """The quotas `tenant quotas` takes, when the command is `tenant` (else none)."""
    if not needed:
        return {}
    from prefixes.catalog.records import QUOTA_LIMITS

    return QUOTA_LIMITS


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags fall back to PREFIX_SERVER_* and defaults."""
    from server.config import Settings

    for name, field in Settings.model_fields.items():
        kwargs: dict[str, Any] = {"default": None, "help": field.description, "dest": name}
        choices = literal_choices(field.annotation)
        if choices:
            kwargs["choices"] = choices
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def literal_choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def settings_from(args: argparse.Namespace) -> Settings:
    from server.config import Settings

    given = {
        k: getattr(args, k) for k in Settings.model_fields if getattr(args, k, None) is not None
    }
    return Settings(**given)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app

    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if settings.admin_key is None:
        settings = settings.model_copy(update={"admin_key": SecretStr(dev_admin_key(settings))})
    if settings.replicas is not None:
        from server.scale.launch import run_replicas

        return run_replicas(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # The app logs every request once, as JSON with its request id (access_log.py):
        # uvicorn's own access line would say it twice.
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 1,
    )
    return 0


def dev_admin_key(settings: Settings) -> str:
    """No admin key configured: use the data directory's own (created once, mode 0600)."""
    path = settings.data_dir / "admin_key"
    if path.exists():
        print(f"admin key: read from {path}", file=sys.stderr)
        return path.read_text().strip()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = "psk-admin-" + secrets.token_urlsafe(24)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    print(f"admin key (shown once; stored in {path}, mode 0600): {key}", file=sys.stderr)
    return key


def add_catalog_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--database-url", default=None)


def open_catalog(args: argparse.Namespace) -> Catalog:
    """The catalog alone: managing tenants needs no model, so the `tenant` commands work
    offline, and beside a running server on the same database (a revoked key is refused by
    the server's next request)."""
    from prefixes.catalog.catalog import Catalog
    from server.config import Settings

    given = {"data_dir": args.data_dir, "database_url": args.database_url}
    settings = Settings(**{k: v for k, v in given.items() if v})
    return Catalog(settings.data_dir, database_url=settings.database_url)


def quota_value(limit: int) -> Callable[[str], int | str]:
    """An argparse type: an integer from 0 to `limit`, or the word 'default'."""

    def parse(text: str) -> int | str:
        if text == "default":
            return text
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= limit:
            raise argparse.ArgumentTypeError(
                f"expected an integer from 0 to {limit} or 'default', found {text!r}"
            )
        return value

    return parse


def run_on_catalog(args: argparse.Namespace, action: Callable[[Catalog], str]) -> int:
    """Print what `action` returns, or the registry's refusal on stderr (exit status 1)."""
    from prefixes import PrefixError

    try:
        with open_catalog(args) as catalog:
            printed = action(catalog)
    except PrefixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(printed)
    return 0


def run_tenant_create(args: argparse.Namespace) -> int:
    def create(catalog: Catalog) -> str:
        issued = catalog.create_tenant(args.name)
        return f"tenant: {issued.tenant}\napi_key: {issued.api_key}"

    return run_on_catalog(args, create)


def describe_tenant(catalog: Catalog, name: str) -> str:
    """One `field: value` line each: the tenant's effective quotas, then its usage."""
    tenant = catalog.get_tenant(name)
    used = catalog.usage(name)
    quotas = {
        "max_prefixes": tenant.quotas.max_prefixes,
        "max_bytes": tenant.quotas.max_bytes,
        "max_virtual_tokens": tenant.quotas.max_virtual_tokens,
    }
    lines = [f"tenant: {tenant.name}", f"created_at: {tenant.created_at.isoformat()}"]
    lines += [f"{quota}: {'no limit' if v is None else v}" for quota, v in quotas.items()]
    lines += [f"prefixes: {used.prefixes}", f"bytes: {used.bytes}"]
    return "\n".join(lines)


def run_tenant_show(args: argparse.Namespace) -> int:
    return run_on_catalog(args, lambda catalog: describe_tenant(catalog, args.name))


def run_tenant_quotas(args: argparse.Namespace) -> int:
    changes = {
        quota: None if value == "default" else value
        for quota in quota_limits(True)
        if (value := getattr(args, quota)) is not None
    }

    def update(catalog: Catalog) -> str:
        catalog.update_quotas(args.name, **changes)
        return describe_tenant(catalog, args.name)

    return run_on_catalog(args, update)


def run_tenant_keys(args: argparse.Namespace) -> int:
    def listing(catalog: Catalog) -> str:
        rows = [("key_id", "created_at", "state")] + [
            (key.key_id, key.created_at.isoformat(), "revoked" if key.revoked else "active")
            for key in catalog.list_keys(args.name)
        ]
        width = max(len(row[0]) for row in rows)
        created = max(len(row[1]) for row in rows)
        return "\n".join(f"{a:<{width}}  {b:<{created}}  {c}" for a, b, c in rows)

    return run_on_catalog(args, listing)


def run_tenant_issue_key(args: argparse.Namespace) -> int:
    def issue(catalog: Catalog) -> str:
        issued = catalog.issue_key(args.name)
        return f"tenant: {issued.tenant}\nkey_id: {issued.key_id}\napi_key: {issued.api_key}"

    return run_on_catalog(args, issue)


def run_tenant_revoke_key(args: argparse.Namespace) -> int:
    def revoke(catalog: Catalog) -> str:
        catalog.revoke_key(args.name, args.key_id)
        if not any(not key.revoked for key in catalog.list_keys(args.name)):
            print(
                f"warning: tenant {args.name} has no active key left; "
                f"`prefix-server tenant issue-key {args.name}` makes one",
                file=sys.stderr,
            )
        return f"revoked key {args.key_id} of tenant {args.name}"

    return run_on_catalog(args, revoke)


def read_prefix_files(path: Path) -> dict[str, bytes]:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return {f.name: f.read_bytes() for f in files if f.is_file()}


def run_upload(args: argparse.Namespace) -> int:
    import httpx

    if not args.api_key:
        print("error: --api-key (or PREFIX_SERVER_API_KEY) is required", file=sys.stderr)
        return 2
    if not args.path.exists():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    files = [
        ("files", (name, data))
        for name, data in read_prefix_files(args.path).items()
        if name.endswith((".json", ".safetensors", ".bin", ".pt"))
    ]
    fields = {
        "name": args.name,
        "description": args.description,
        "overwrite": str(args.overwrite).lower(),
    }
    if args.visibility is not None:
        fields["visibility"] = args.visibility
    response = httpx.post(
        f"{args.url.rstrip('/')}/v1/prefixes",
        data=fields,
        files=files,
        headers={"Authorization": f"Bearer {args.api_key}"},
        timeout=120,
    )
    print(response.text)
    return 0 if response.status_code == 201 else 1


def run_download(args: argparse.Namespace) -> int:
    import io
    import zipfile

    import httpx

    from prefixes.formats.adapters import PEFT_CONFIG, PEFT_WEIGHTS

    if not args.api_key:
        print("error: --api-key (or PREFIX_SERVER_API_KEY) is required", file=sys.stderr)
        return 2
    if args.ref.count("/") != 1:
        print(f"error: expected owner/name, found {args.ref!r}", file=sys.stderr)
        return 2
    params = {} if args.version is None else {"version": args.version}
    response = httpx.get(
        f"{args.url.rstrip('/')}/v1/prefixes/{args.ref}/adapter",
        params=params,
        headers={"Authorization": f"Bearer {args.api_key}"},
        timeout=120,
    )
    if response.status_code != 200:
        print(response.text, file=sys.stderr)
        return 1
    # The archive holds two plain names; written by name, never by a path the archive gives.
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        files = {name: archive.read(name) for name in (PEFT_CONFIG, PEFT_WEIGHTS)}
    args.out.mkdir(parents=True, exist_ok=True)
    for file_name, data in files.items():
        (args.out / file_name).write_bytes(data)
    version = response.headers.get("X-Prefix-Version", "?")
    print(f"{args.ref} version {version}: adapter written to {args.out}")
    return 0


# The table's columns: (heading, the usage object's field), failures summed into one.
USAGE_TABLE = (
    ("requests", "requests"),
    ("rows", "rows"),
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("virtual", "virtual_tokens"),
    ("tuning", "tuning_tokens"),
    ("failed", "failed"),
    ("cancelled", "cancelled"),
)
FAILURES = ("failed_invalid", "failed_rate_limited", "failed_overloaded", "failed_error")


def run_usage(args: argparse.Namespace) -> int:
    """Every page of GET /v1/usage, printed as one table (or CSV)."""
    import httpx

    if not args.api_key:
        print("error: --api-key (or PREFIX_SERVER_API_KEY) is required", file=sys.stderr)
        return 2
    params: dict[str, Any] = {"start": args.start, "group_by": args.group_by, "limit": 1000}
    if args.end is not None:
        params["end"] = args.end
    if args.tenant is not None:
        params["tenant"] = args.tenant
    rows: list[dict[str, Any]] = []
    cursor = None
    with httpx.Client(headers={"Authorization": f"Bearer {args.api_key}"}, timeout=60) as client:
        while True:
            try:
                response = client.get(
                    f"{args.url.rstrip('/')}/v1/usage",
                    params={**params, **({"cursor": cursor} if cursor else {})},
                )
            except httpx.HTTPError as exc:
                print(f"error: {args.url}: {exc}", file=sys.stderr)
                return 1
            if response.status_code != 200:
                print(f"error: {response.status_code}: {response.text}", file=sys.stderr)
                return 1
            page = response.json()
            rows += page["data"]
            cursor = page["next"]
            if cursor is None:
                break
    print(usage_csv(rows) if args.csv else usage_table(rows, args.group_by), end="")
    return 0


def usage_csv(rows: list[dict[str, Any]]) -> str:
    """The columns of GET /v1/usage?format=csv, in its order; a null model empty."""
    import csv
    import io

    from prefixes.storage.schema import USAGE_COUNTS

    columns = ("start_time", "end_time", "tenant", "model", *USAGE_COUNTS)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return out.getvalue()


def usage_table(rows: list[dict[str, Any]], group_by: str) -> str:
    """One line per row (its bucket's start in UTC unless grouped by prefix), then the total."""
    from datetime import UTC, datetime

    if not rows:
        return "no usage in this span\n"
    shape = {"day": "%Y-%m-%d", "hour": "%Y-%m-%d %H:00"}.get(group_by)
    headings = (
        *(("start (UTC)",) if shape else ()),
        "tenant",
        "model",
        *(h for h, _ in USAGE_TABLE),
    )
    lines: list[tuple[str, ...]] = []
    totals = dict.fromkeys((field for _, field in USAGE_TABLE), 0)
    for row in rows:
        row = {**row, "failed": sum(row[f] for f in FAILURES)}
        for field in totals:
            totals[field] += row[field]
        start = (datetime.fromtimestamp(row["start_time"], UTC).strftime(shape),) if shape else ()
        counts = (str(row[field]) for _, field in USAGE_TABLE)
        lines.append((*start, row["tenant"], row["model"] or "-", *counts))
    lines.append((*(("",) if shape else ()), "total", "", *(str(v) for v in totals.values())))
    widths = [max(len(line[i]) for line in (headings, *lines)) for i in range(len(headings))]
    texts = len(headings) - len(USAGE_TABLE)  # left-aligned; the counts right-aligned

    def render(line: tuple[str, ...]) -> str:
        cells = [
            cell.ljust(width) if i < texts else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "".join(render(line) + "\n" for line in (headings, *lines))


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from prefixes import PrefixError
    from server.models import load_model
    from server.train import TrainConfig, read_examples, train_prefix

    try:
        loaded = load_model(args.model, cache_dir=args.data_dir / "models")
        init_from = load_init_prefix(args, loaded) if args.init_from else None
        virtual_tokens = args.virtual_tokens
        if virtual_tokens is None:  # a transfer keeps its source's length
            source = init_from
            virtual_tokens = DEFAULT_VIRTUAL_TOKENS if source is None else source.num_virtual_tokens
        config = TrainConfig(
            kind=args.kind,
            virtual_tokens=virtual_tokens,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
        )
        examples = read_examples(args.data, loaded.tokenizer)
        with tqdm(total=config.steps, desc="training", unit="step") as bar:

            def progress(step: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            losses = train_prefix(
                loaded, examples, args.out, config, init_from=init_from, progress=progress
            )
    except (PrefixError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if losses:
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; adapter written to {args.out}")
    return 0


def load_init_prefix(args: argparse.Namespace, loaded: Any) -> Any:
    """The prefix to start training from: a file or folder, or owner/name in the registry."""
    from prefixes import PrefixKind, RawPrefix, read_upload

    path = Path(args.init_from)
    if path.exists():
        return read_upload(read_prefix_files(path))
    from prefixes.registry import Registry

    owner = args.init_from.partition("/")[0]
    # Nothing is uploaded here, so the compiler's length limit never applies.
    with (
        Registry(args.data_dir, compiler=loaded.prefix_compiler(1 << 16)) as registry,
        registry.acquire(args.init_from, tenant=owner) as handle,
    ):
        if args.kind != "prefix":
            raise ValueError(
                "init-from: a registry prefix is stored compiled to KV; it can start "
                "--kind prefix training only (give an adapter folder for --kind prompt)"
            )
        return RawPrefix(PrefixKind.PREFIX_TUNING, handle.prefix.kv.float().cpu())


def run_generate(args: argparse.Namespace) -> int:
    from prefixes import PrefixError, read_upload
    from server.engine.llm import LLM
    from server.engine.request import Request, SamplingParams
    from server.models import load_model

    loaded = load_model(args.model, cache_dir=args.data_dir / "models")
    if loaded.tokenizer is None:
        print("error: the model has no tokenizer", file=sys.stderr)
        return 2
    llm = LLM(loaded, num_slots=1)
    try:
        prefix = llm.compile(read_upload(read_prefix_files(args.prefix))) if args.prefix else None
        sampling = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        prompt = loaded.tokenizer.encode(args.prompt)  # type: ignore[attr-defined]
        (request,) = llm.generate([Request(prompt, sampling, prefix)])
    except (PrefixError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(request.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
