"""Run under torchrun on 4 ranks: rt.shard with tp/cp peers next to the data-parallel
ranks. Each rank writes ``<out>/rank<R>.json``; tests/runtime/test_dist_runtime.py checks."""

from __future__ import annotations

import json
import sys
import traceback

import torch
from torch.utils.data import DataLoader, IterableDataset

from overdrive.plan_spec import Parallel
from runtime_scenarios import runtime

MESHES = {"dp2_tp2": dict(dp_shard=2, tp=2), "dp2_cp2": dict(dp_shard=2, cp=2),
          "cp2_tp2": dict(cp=2, tp=2)}


class CountingStream(IterableDataset):
    """A stream that counts how often this process opened it."""

    opened = 0

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        CountingStream.opened += 1
        return iter(torch.arange(self.n).split(1))


def dispatch(parallel: dict) -> dict:
    rt = runtime(seed=7, parallel=Parallel(**parallel))
    CountingStream.opened = 0
    loader = rt.shard(DataLoader(CountingStream(11), batch_size=2))
    batches = [(b.flatten().tolist(), loader.n_real) for b in loader]
    return {"batches": batches, "opened": CountingStream.opened, "dp_rank": rt.dp_rank,
            "dispatch": loader.dispatch}


def main() -> None:
    out_dir = sys.argv[1]
    result = {}
    for name, parallel in MESHES.items():
        try:
            result[name] = dispatch(parallel)
        except Exception:  # noqa: BLE001 — reported in the JSON, the test fails on it
            result[name] = {"error": traceback.format_exc()}
    with open(f"{out_dir}/rank{torch.distributed.get_rank()}.json", "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
