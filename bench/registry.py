"""Registry latencies: upload to servable, cold load to the device, warm acquire; 10,000 prefixes.

    python bench/registry.py [--device cpu|cuda] [--count 10000] [--write docs/benchmarks.md]

Part 1 uses a model with SmolLM2-135M's geometry (30 layers, 3 KV heads of 64; random weights,
which cost the same to run) and prefixes of 23 virtual tokens, whose compiled float32 KV is the
1 MB file the registry stores. Part 2 registers `--count` prefixes through `upload` (tiny Llama
geometry, 2 virtual tokens, distinct random bytes, 10 tenants, a third public) and times listing,
resolve and acquire among them. Every upload is the real path: read, validate, compile, write and
fsync the file, rename, fsync the directory, commit (SQLite WAL, synchronous=FULL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command, machine, write_section
from prefixes import ModelSpec, PrefixKind, RawPrefix, write_native
from prefixes.registry import Registry
from server.models import LoadedModel, freeze, wrap_model

TOKENS_1MB = 23  # 30 layers * 2 * 3 heads * 64 * 4 bytes = 46,080 bytes per token
TENANTS = [f"tenant{i}" for i in range(10)]


def smollm2_geometry(device: str) -> LoadedModel:
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return wrap_model(freeze(AutoModelForCausalLM.from_config(config), device), None, "smollm2")


def tiny_geometry(device: str) -> LoadedModel:
    config = LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return wrap_model(freeze(AutoModelForCausalLM.from_config(config), device), None, "tiny")


def upload_files(spec: ModelSpec, kind: PrefixKind, tokens: int, seed: int) -> dict[str, bytes]:
    generator = torch.Generator().manual_seed(seed)
    if kind.is_soft_prompt:
        tensor = torch.randn(tokens, spec.hidden_size, generator=generator)
    else:
        shape = (spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim)
        tensor = torch.randn(shape, generator=generator)
    return {"prefix.safetensors": write_native(RawPrefix(kind, tensor))}


def open_registry(data_dir: Path, loaded: LoadedModel, **options) -> Registry:
    return Registry(data_dir, compiler=loaded.prefix_compiler(64), **options)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def acquire_release(registry: Registry, ref: str, tenant: str) -> None:
    registry.acquire(ref, tenant=tenant).release()


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages, so the next read goes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def ms(seconds: list[float]) -> str:
    median = statistics.median(seconds) * 1000
    p90 = statistics.quantiles(seconds, n=10)[-1] * 1000 if len(seconds) >= 10 else median
    return f"{median:.2f} ms (p90 {p90:.2f})"


def one_megabyte(device: str, repeats: int, root: Path) -> list[str]:
    loaded = smollm2_geometry(device)
    dev = loaded.device
    rows = []
    with open_registry(root / "mb", loaded) as registry:
        registry.create_tenant("alice")
        names: list[str] = []
        for kind in (PrefixKind.PREFIX_TUNING, PrefixKind.PROMPT_TUNING):
            uploads, acquires = [], []
            for i in range(repeats + 1):
                files = upload_files(loaded.spec, kind, TOKENS_1MB, seed=len(names))
                name = f"{kind.value}-{i}".replace("_", "-")
                started = time.perf_counter()
                info = registry.upload("alice", name, files)
                uploaded = time.perf_counter()
                with registry.acquire(name, tenant="alice"):
                    synchronize(dev)
                    done = time.perf_counter()
                names.append(name)
                if i:  # the first of each kind warms up allocators and kernels
                    uploads.append(uploaded - started)
                    acquires.append(done - uploaded)
            total = [u + a for u, a in zip(uploads, acquires, strict=True)]
            rows.append(
                f"| upload to servable, {kind.value} ({info.bytes / 1e6:.2f} MB stored) | "
                f"{ms(total)} | upload {ms(uploads)}; first acquire {ms(acquires)} |"
            )
        blob_paths = list((root / "mb" / "blobs").glob("*/*"))

    # Cold: a fresh registry (nothing resident) and the files' pages dropped from the OS cache.
    for path in blob_paths:
        drop_page_cache(path)
    with open_registry(root / "mb", loaded) as registry:
        cold = [timed(partial(acquire_release, registry, n, "alice"), dev) for n in names]
        load = registry.stats().load_seconds_total / registry.stats().misses
        warm = [
            timed(partial(acquire_release, registry, names[0], "alice"), dev) for _ in range(1000)
        ]
    rows.append(
        f"| cold acquire, disk -> {dev.type} (file dropped from page cache) | {ms(cold)} | "
        f"of which the load (read, sha256 check, decode, copy): {load * 1000:.2f} ms mean |"
    )
    # Host tier: a device pool that holds one prefix, two prefixes taking turns.
    with open_registry(root / "mb", loaded, device_pool_bytes=1 << 21) as registry:
        for name in names[:2]:
            registry.acquire(name, tenant="alice").release()
        host = [timed(partial(acquire_release, registry, n, "alice"), dev) for n in names[:2] * 50]
        assert registry.stats().host_hits == len(host), registry.stats()
    rows.append(f"| acquire from the host tier -> {dev.type} | {ms(host)} | |")
    rows.append(f"| warm acquire + release (resident on {dev.type}) | {ms(warm)} | |")
    return rows


def ten_thousand(device: str, count: int, root: Path) -> list[str]:
    loaded = tiny_geometry(device)
    dev = loaded.device
    with open_registry(root / "scale", loaded) as registry:
        for tenant in TENANTS:
            registry.create_tenant(tenant)
        started = time.perf_counter()
        uploads = []
        for i in range(count):
            files = upload_files(loaded.spec, PrefixKind.PREFIX_TUNING, 2, seed=i)
            visibility = "public" if i % 3 == 0 else "private"
            upload = partial(
                registry.upload,
                TENANTS[i % len(TENANTS)],
                f"p{i:06d}",
                files,
                visibility=visibility,
            )
            uploads.append(timed(upload, dev))
            if (i + 1) % 1000 == 0:
                print(f"  {i + 1} uploaded", flush=True)
        registration = time.perf_counter() - started
        reader = TENANTS[1]
        pages, cursor = [], None
        while True:
            started = time.perf_counter()
            page = registry.list_prefixes(tenant=reader, scope="all", limit=100, cursor=cursor)
            pages.append(time.perf_counter() - started)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        refs = [
            (f"{TENANTS[i % len(TENANTS)]}/p{i:06d}", TENANTS[i % len(TENANTS)])
            for i in range(0, count, 7)
        ]
        resolve = [timed(partial(registry.resolve, r, tenant=t), dev) for r, t in refs]
        cold = [timed(partial(acquire_release, registry, r, t), dev) for r, t in refs]
        warm = [timed(partial(acquire_release, registry, r, t), dev) for r, t in refs]
    size = sum(p.stat().st_size for p in (root / "scale").rglob("*") if p.is_file())
    return [
        f"| register {count} prefixes through upload | {registration:.1f} s in all | "
        f"{ms(uploads)} per upload |",
        f"| list all visible to one tenant, pages of 100 ({len(pages)} pages) | {ms(pages)} "
        "per page | |",
        f"| resolve among {count} | {ms(resolve)} | {len(refs)} refs |",
        f"| cold acquire among {count} (file in page cache) | {ms(cold)} | |",
        f"| warm acquire + release among {count} | {ms(warm)} | |",
        f"| data directory | {size / 1e6:.1f} MB | database and {count} files |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--data-dir", type=Path, help="where to build registries (default: a temp dir)"
    )
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    parser.add_argument("--section", default="registry")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.data_dir) as root:
        rows = one_megabyte(args.device, args.repeats, Path(root))
        for row in rows:
            print(row, flush=True)
        scale = ten_thousand(args.device, args.count, Path(root))
    body = "\n".join(
        [
            f"## Prefix registry ({args.device})",
            "",
            f"Machine: {machine()}.",
            f"Command: `{command()}`.",
            "Part 1: a model of SmolLM2-135M's geometry (random weights), prefixes of "
            f"{TOKENS_1MB} virtual tokens whose compiled float32 KV is the ~1 MB stored file; "
            f'median and p90 over {args.repeats} uploads after one warm-up. "Servable" is the '
            "first `acquire` returning a handle to KV on the device. Part 2: the tiny Llama "
            "geometry, 2 virtual tokens, distinct random prefixes across 10 tenants (a third "
            "public). Every upload fsyncs its file, its directory and the SQLite WAL. The disk "
            "is a shared virtual disk: figures that touch it are noisy.",
            "",
            "| operation | latency | detail |",
            "|---|---|---|",
            *rows,
            *scale,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, args.section, body)


if __name__ == "__main__":
    main()
