"""Stopping a command (Ctrl-C, SIGTERM) and the one line that says how to pick it up again.

The advice names the exact command to run, because how a command resumes depends on it: `cocomix run` and
the single stages continue from their partial outputs when run again (their `StageSession` resumes them),
while `cocomix pretrain` refuses to touch its checkpoints without `--resume`. `--force` is dropped from the
advice: it would throw away what the interrupted run left instead of resuming it.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass


def resume_flags() -> dict[str, str | None]:
    """Commands whose rerun resumes them, each with the flag the rerun needs (None: the same command):
    `cocomix run`, and each stage's own command that its declaration says resumes."""
    from pipelines.stages.workflow import stage_specs

    return {"run": None, **{s.command: s.resume_flag for s in stage_specs() if s.command and s.resumes}}


# Flags that must not be repeated to resume: `--force` starts the stage over.
NOT_TO_REPEAT = ("--force",)


@dataclass(frozen=True)
class Invocation:
    """What the user typed, split as `CocomixGroup.parse_args` reads it."""

    global_args: tuple[str, ...]
    command_args: tuple[str, ...]  # the command's name (and a subcommand's), then its own arguments

    @property
    def command(self) -> str | None:
        first = self.command_args[0] if self.command_args else None
        return None if first is None or first.startswith("-") else first  # `cocomix --help` has none


def resume_command(invocation: Invocation | None) -> str | None:
    """The command line that continues this interrupted command, or None when it has nothing to resume.

    The command comes first, then the flag resuming needs, then the rest as typed (global options after the
    command are accepted), e.g. `cocomix pretrain --resume --objective kd --set pretrain.lr=0.001`.
    """
    flags = resume_flags()
    if invocation is None or invocation.command not in flags:
        return None
    name, *own = invocation.command_args
    flag = flags[name]
    kept = [arg for arg in own if arg not in NOT_TO_REPEAT]
    if flag is not None and flag not in kept:
        kept.insert(0, flag)
    return shlex.join(["cocomix", name, *kept, *invocation.global_args])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt is, so that a stage stops the same way on both."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def interrupted_message(invocation: Invocation | None, interrupt: KeyboardInterrupt) -> str:
    """`interrupted: run `CMD` to resume.` (or `stopped by SIGTERM: ...`), without advice where none holds."""
    what = f"stopped by {interrupt.signal_name}" if isinstance(interrupt, Terminated) else "interrupted"
    command = resume_command(invocation)
    return f"{what}: run `{command}` to resume." if command else f"{what}."


def full_disk_message(invocation: Invocation | None, exc: OSError) -> str:
    """One line for ENOSPC (or a quota): what failed, that nothing was marked complete, how to go on.

    Stages write through temporary names and mark themselves complete last, so a full disk leaves a
    resumable stage, not a finished-looking one; what the line adds is where, and the command to continue.
    """
    where = f" while writing {exc.filename}" if exc.filename else ""
    command = resume_command(invocation)
    then = f"then run `{command}` to continue" if command else "then run the same command again"
    return (
        f"error: {exc.strerror or 'no space left on device'}{where}. Nothing was marked complete: free some "
        f"space (or set `run.dir` on a larger disk), {then}."
    )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, the first SIGTERM raises `Terminated`; a second one kills the process at once.

    Without this, SIGTERM kills the process silently (exit 143) with the stage's lock and manifest left for
    the next run to sort out; with it, the stage stops as on Ctrl-C and the user is told how to resume.
    Stages that stop gracefully on SIGTERM (pretrain) install their own handler over this one.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        yield  # signals reach the main thread only; and whoever started us chose to ignore SIGTERM
        return

    def handler(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
