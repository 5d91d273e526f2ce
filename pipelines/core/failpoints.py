"""Named instants at which a test can kill the process, to prove that a stage survives a kill exactly there.

`COCOMIX_KILL_AT=NAME` in the environment makes `kill_point(NAME)` send SIGKILL to its own process; random
kills find most crash-safety bugs, these reach the instants that random kills rarely hit (between two
steps of a clear, say). Unset, a kill point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "COCOMIX_KILL_AT"


def kill_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
