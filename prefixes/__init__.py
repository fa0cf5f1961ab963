"""Everything about a prefix that does not need HTTP: formats, validation, compilation.

This package never imports `server`: it receives the model's geometry as a `ModelSpec` and,
to compile a soft prompt, a callable that runs embeddings through the frozen model (both held
by a `PrefixCompiler`).
"""

from prefixes.errors import InvalidPrefix, PrefixError, UnsupportedFormat
from prefixes.formats.adapters import read_native, read_peft, read_upload, write_native
from prefixes.formats.compile import PrefixCompiler, compile_prefix
from prefixes.formats.kinds import CompiledPrefix, PrefixKind, RawPrefix
from prefixes.formats.spec import ModelSpec
from prefixes.formats.validate import validate

__all__ = [
    "CompiledPrefix",
    "InvalidPrefix",
    "ModelSpec",
    "PrefixCompiler",
    "PrefixError",
    "PrefixKind",
    "RawPrefix",
    "UnsupportedFormat",
    "compile_prefix",
    "read_native",
    "read_peft",
    "read_upload",
    "validate",
    "write_native",
]
