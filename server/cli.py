"""The `prefix-server` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefixes import PrefixError, read_upload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-server")
    commands = parser.add_subparsers(dest="command", required=True)

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

    args = parser.parse_args(argv)
    return int(args.run(args))


def read_prefix_files(path: Path) -> dict[str, bytes]:
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return {f.name: f.read_bytes() for f in files if f.is_file()}


def run_generate(args: argparse.Namespace) -> int:
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
