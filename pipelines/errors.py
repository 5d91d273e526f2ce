"""Errors that mean "the user asked for something that cannot be done as asked".

The CLI turns a `CocomixError` into one line on stderr and exit code 2; any other exception is a bug
and keeps its traceback.
"""


class CocomixError(Exception):
    """A user mistake or unusable input; the message says what, where, and how to fix it."""


class ConfigError(CocomixError):
    """`cocomix.toml`, a `--set` override or a command flag is invalid."""


class InputError(CocomixError):
    """An input file, corpus, tokenizer or model cannot be used."""


class StageError(CocomixError):
    """A stage cannot start: it is locked, its inputs are missing, or its outputs belong to another run."""


class OtherRankError(StageError):
    """Rank 0's error, raised on every other rank of a torchrun job too so that all of them stop; rank 0
    prints it, the others exit with its code without repeating the line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for messages
    that quote what a library said without its whole traceback-sized text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
