"""One Settings object: every flag of `prefix-server serve`, also as PREFIX_SERVER_* variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefixes.storage.pool import DEFAULT_DEVICE_POOL_BYTES, DEFAULT_HOST_POOL_BYTES
from server.engine.config import GAP_TARGET, MAX_STEP_TOKENS, EngineConfig

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIX_SERVER_", extra="forbid")

    model: str | None = Field(
        None, description="local folder or cached hub name; default: embedded SmolLM2"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    data_dir: Path = Field(Path("data"), description="registry, prefix files, model cache")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel")
    admin_key: SecretStr | None = Field(None, description="key for /v1/tenants")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite in the data directory"
    )
    store_dir: Path | None = Field(
        None,
        description="prefix files, shared by every replica (a network filesystem across "
        "machines); default: the data directory",
    )
    replicas: int | None = Field(
        None,
        ge=1,
        description="serve from this many replicas on Ray Serve (needs --database-url); "
        "default: one process",
    )
    max_replicas: int | None = Field(
        None,
        ge=1,
        description="with --replicas: autoscale up to this many on ongoing requests; "
        "default: --replicas, fixed",
    )
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica")
    file_grace: float | None = Field(
        None,
        ge=0,
        description="seconds a deleted prefix's file stays on disk for replicas still loading "
        "it; default: 0 in one process, 60 with --replicas",
    )
    num_slots: int = Field(16, ge=1, description="rows decoded together")
    max_len: int = Field(2048, ge=16, description="positions per request: prefix + prompt + output")
    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="KV block pool; default: every row at max_len on cpu, half the free memory "
        "on cuda",
    )
    max_waiting: int = Field(256, ge=1, description="queued requests before 429")
    max_waiting_per_tenant: int = Field(
        64, ge=1, description="queued requests of one tenant before that tenant gets 429"
    )
    max_step_tokens: int = Field(
        MAX_STEP_TOKENS,
        ge=2,
        description="tokens fed per step at most (a bound on activation memory); how many a step "
        "takes is set by --gap-target",
    )
    gap_target: float | None = Field(
        GAP_TARGET,
        ge=1,
        description="while rows stream, a step prefilling prompts beside them may take this "
        "multiple of what their decode alone costs (measured on the device at start-up); "
        "unset: only --max-step-tokens bounds a step",
    )
    max_running_per_tenant: int = Field(8, ge=0, description="rows one tenant may hold; 0: no cap")
    static_decode: bool | None = Field(
        None,
        description="decode steps on static shapes (rows padded to batch-size buckets); "
        "default: on for cuda, off for cpu",
    )
    cuda_graphs: bool = Field(
        True, description="replay static decode steps as CUDA graphs (cuda only)"
    )
    attention_kernel: Literal["gather", "paged"] | None = Field(
        None,
        description="how attention reads the KV pool: gather rows for sdpa, or paged "
        "(FlexAttention through the block tables, compiled on cuda); default: gather",
    )
    max_virtual_tokens: int = Field(256, ge=1, description="largest prefix length accepted")
    max_new_tokens_limit: int = Field(4096, ge=1, description="largest max_new_tokens accepted")
    max_prompts_per_call: int = Field(16, ge=1, description="prompts in one /v1/completions call")
    max_choices: int = Field(
        16, ge=1, le=128, description="n: choices of one prompt (rows decoded together)"
    )
    max_ensemble_members: int = Field(
        16, ge=2, le=256, description="prefixes in one prompt ensemble (rows decoded together)"
    )
    max_ensembles_per_tenant: int = Field(100, ge=0, description="stored ensembles per tenant")
    max_request_bytes: int = Field(
        1 * MiB, ge=1024, description="largest JSON request body (413 beyond, before auth)"
    )
    max_upload_bytes: int = Field(64 * MiB, ge=1024, description="largest upload (413 beyond)")
    device_pool_bytes: int = Field(
        DEFAULT_DEVICE_POOL_BYTES, ge=1, description="compiled prefixes on device"
    )
    host_pool_bytes: int = Field(
        DEFAULT_HOST_POOL_BYTES, ge=0, description="evicted prefixes kept in RAM"
    )
    max_pinned_share_per_tenant: float = Field(
        0.25,
        gt=0,
        le=1,
        description="share of the device pool one tenant's in-flight requests may pin (429 beyond)",
    )
    train_share: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="share of the device's time fine-tuning may take while requests run",
    )
    max_running_jobs: int = Field(
        2, ge=0, description="fine-tuning jobs training at once (one per tenant); 0: none"
    )
    max_jobs_per_tenant: int = Field(
        16, ge=1, description="a tenant's fine-tuning jobs not yet finished (422 beyond)"
    )
    max_training_steps: int = Field(
        10_000, ge=1, description="optimiser steps one fine-tuning job may take"
    )
    max_transferability_candidates: int = Field(
        32, ge=1, le=1024, description="prefixes one transferability request scores at most"
    )
    max_transferability_sample: int = Field(
        64,
        ge=1,
        le=4096,
        description="examples of a training file one transferability request scores at most",
    )
    checkpoint_interval: float = Field(
        30.0,
        ge=0,
        description="seconds of training a running fine-tuning job may lose to a crash: it "
        "checkpoints at the first step end after this long; 0: after every step",
    )
    checkpoints_per_job: int = Field(
        3, ge=1, description="checkpoints a running fine-tuning job keeps (its newest)"
    )
    job_lease: float = Field(
        30.0,
        gt=0,
        description="seconds a fine-tuning job's runner may go silent before another server "
        "on the database takes the job over (its heartbeat renews it every third)",
    )
    max_training_file_bytes: int = Field(
        16 * MiB, ge=1024, description="largest training file upload (413 beyond)"
    )
    max_files_per_tenant: int = Field(100, ge=0, description="training files one tenant may keep")
    max_file_bytes_per_tenant: int = Field(
        256 * MiB, ge=0, description="bytes of training files one tenant may keep"
    )
    requests_per_minute: int = Field(
        60_000,
        ge=0,
        description="a tenant's requests per minute, unless the admin sets its own (429 beyond)",
    )
    tokens_per_minute: int = Field(
        10_000_000,
        ge=0,
        description="a tenant's tokens per minute (prompt + max tokens reserved at admission), "
        "unless the admin sets its own (429 beyond)",
    )
    rate_limit_refresh: float = Field(
        5.0,
        gt=0,
        description="seconds between reads of the tenants' own rate limits (another replica's "
        "change reaches this one within it)",
    )
    usage_flush_interval: float = Field(
        2.0,
        gt=0,
        description="seconds between writes of the usage counted in memory (a kill -9 loses "
        "at most this much)",
    )
    shutdown_grace: float = Field(10.0, ge=0, description="seconds to finish requests on SIGTERM")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="logging")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device: expected a machine with CUDA, found none")
        if self.replicas is not None and self.database_url is None:
            raise ValueError(
                "replicas: expected --database-url too (replicas share the registry in a "
                "database server such as PostgreSQL), found none"
            )
        if self.max_replicas is not None and self.max_replicas < (self.replicas or 1):
            raise ValueError(
                f"max_replicas: expected at least --replicas ({self.replicas or 1}), "
                f"found {self.max_replicas}"
            )
        return self

    @property
    def rate_limit_share(self) -> int:
        """Replicas each enforce this share of a tenant's limits (docs/reliability.md): the
        most replicas that may run, so together they never allow more than the limit."""
        return self.max_replicas or self.replicas or 1

    @property
    def prefix_store(self) -> Path:
        """Where the prefix files live: shared by every replica."""
        return self.store_dir or self.data_dir

    @property
    def file_grace_seconds(self) -> float:
        """One process collects a deleted prefix's file at once; replicas may still be loading
        it, so with --replicas it stays a while (docs/scale-out.md)."""
        if self.file_grace is not None:
            return self.file_grace
        return 0.0 if self.replicas is None else 60.0

    def engine_config(self) -> EngineConfig:
        """The engine's configuration: the one place settings become engine knobs."""
        return EngineConfig(
            num_slots=self.num_slots,
            max_len=self.max_len,
            max_step_tokens=max(self.max_step_tokens, self.num_slots + 1),
            gap_target=self.gap_target,
            kv_cache_bytes=self.kv_cache_bytes,
            max_waiting=self.max_waiting,
            max_waiting_per_tenant=self.max_waiting_per_tenant,
            max_running_per_tenant=self.max_running_per_tenant,
            static_decode=self.static_decode,
            cuda_graphs=self.cuda_graphs,
            attention_kernel=self.attention_kernel,
        )

    @property
    def rows_per_request(self) -> int:
        """Rows one request may run side by side (`n` choices, an ensemble's members): the
        server's choice limit, the engine's slots and what one tenant may hold at once."""
        rows = [self.max_choices, self.num_slots]
        if self.max_running_per_tenant:
            rows.append(self.max_running_per_tenant)
        return min(rows)

    @property
    def model_cache(self) -> Path:
        return self.data_dir / "models"
