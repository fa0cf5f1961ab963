"""What fine-tuning refuses in a request or a training file: a 400 naming the field (and the
line of the file)."""

from __future__ import annotations


class TuningError(ValueError):
    """A job the server cannot run as asked, or a training file it cannot train on."""

    def __init__(self, field: str, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.line = line


class SourceChanged(Exception):
    """The prefix a job transfers from was replaced, after the job was created, by a version
    the job cannot start from (another kind or length): the job fails naming both."""
