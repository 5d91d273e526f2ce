"""`python tests/rank_probe.py ARGS...` runs `cocomix ARGS...` (under torchrun: each rank) with probes, and
at exit writes `probe-<rank>.json` into `$COCOMIX_PROBE_DIR`: the reduce-scatters of each optimizer step
(counted at `torch.distributed.reduce_scatter_single`, which FSDP2 calls per unit) and Dynamo's counters.

A separate entry point because the probes must be in the ranks' own processes, which torchrun starts.
"""

import atexit
import json
import os
import runpy
import sys

import torch.distributed as dist
from torch._dynamo.utils import counters

from pipelines.training.trainer import Trainer

reduce_scatters_per_step: list[int] = []
_reduce_scatter = dist.reduce_scatter_single
_train_step = Trainer._train_step


def counting_reduce_scatter(*args, **kwargs):
    reduce_scatters_per_step[-1] += 1
    return _reduce_scatter(*args, **kwargs)


def marking_train_step(trainer, *args):
    reduce_scatters_per_step.append(0)
    return _train_step(trainer, *args)


def write_probe() -> None:
    rank = os.environ.get("RANK", "0")
    found = {
        "reduce_scatters_per_step": reduce_scatters_per_step,
        "dynamo": {name: {str(k): v for k, v in values.items()} for name, values in counters.items()},
    }
    with open(os.path.join(os.environ["COCOMIX_PROBE_DIR"], f"probe-{rank}.json"), "w") as fh:
        json.dump(found, fh)


# The probes replace module attributes in this process only, before cocomix runs.
dist.reduce_scatter_single = counting_reduce_scatter
Trainer._train_step = marking_train_step
atexit.register(write_probe)
sys.argv = ["cocomix", *sys.argv[1:]]
runpy.run_module("cocomix_cli", run_name="__main__")
