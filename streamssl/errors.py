"""The two kinds of error a user of streamssl meets, and the exit codes the CLI gives them.

- ``UsageError`` (exit 2): what the user asked for is wrong or cannot fit: a configuration value, a shard
  URL or pattern, a path given on the command line, a checkpoint written for another model, credentials
  a server refuses. Running it again unchanged fails again; the message says what to change.
- ``RuntimeFailure`` (exit 1): the world failed a correct request: a server that does not answer, a disk
  that is full, a stream that broke. The message says what failed; trying again later may work.

Modules raise their own subclasses (``ConfigError``, ``SourceError``, ``CheckpointError``, ...) so that
callers can catch precisely; the CLI only needs ``exit_code``. Anything else reaching the CLI is a bug or an
unforeseen failure: exit 1, with the traceback behind ``--debug``.
"""

from __future__ import annotations


class StreamsslError(Exception):
    """Base of the errors streamssl raises on purpose. Exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class UsageError(StreamsslError):
    """The configuration or the command line is wrong: exit code 2."""

    exit_code = 2


class RuntimeFailure(StreamsslError):
    """A correct request failed at run time (a service down, a disk full): exit code 1."""

    exit_code = 1


def exit_code(exc: BaseException) -> int:
    """2 for usage and configuration errors, 1 for everything else."""
    return getattr(exc, "exit_code", 1) if isinstance(exc, StreamsslError) else 1


__all__ = ["RuntimeFailure", "StreamsslError", "UsageError", "exit_code"]
