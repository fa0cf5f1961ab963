"""bench/gpu_decode.py runs end to end (its dry run: a micro model on the CPU), so the script a
GPU session runs through bench/gpu.sh is known to work but for its CUDA-only parts."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gpu_decode


def test_gpu_benchmark_dry_run_writes_every_section(tmp_path: Path) -> None:
    assert gpu_decode.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path)]) == 0

    report = (tmp_path / gpu_decode.REPORT).read_text()
    sections = ("env", "engine", "paths", "profile", "transformers", "peft", "kernels", "targets")
    for section in sections:
        assert f"<!-- gpu_decode_{section}:start -->" in report, section
    assert "<!-- load_micro_4_slots:start -->" in report
    assert "failed" not in report
    results = json.loads((tmp_path / gpu_decode.RESULTS).read_text())
    engine = results["engine"]["micro/3"]
    assert engine["path"] == "static, eager"  # the GPU's decode path, run without graphs
    assert engine["ms_different"] > 0 and engine["floor_ms"] > 0
    assert set(results["paths"]["micro-llama/3"]) == {"static, eager", "dynamic"}
    assert results["transformers"]["micro/3"]["ms"] > 0
    assert "ms_per_token" in results["peft"]["micro/3"]
    assert len(results["load"]) == 2
    kernels = results["kernels"]["micro/3"]
    assert kernels["path"] == "static, eager" and set(kernels["ms"]) == {"gather", "paged"}
    assert "aten::" in (tmp_path / gpu_decode.PROFILE).read_text()
