"""Checkpoint I/O: save and load MB/s of a ~100M-parameter model (weights only).

    python benchmarks/checkpoint_io.py [--quick] [--rounds N] [--dir DIR]

Variants, run alternately (rotating order each round) and reported as medians; every
save writes a fresh path, as training writes step-N after step-N-1:
  rt.save / rt.load          overdrive (DCP + manifest/crc32 + atomic rename)
  safetensors                safetensors.torch.save_file / load_file   (the baseline)
  torch.save                 torch.save / torch.load(weights_only=True)
  dcp                        torch.distributed.checkpoint.save / load, single process
  accelerate                 Accelerator.save_state / load_state (row says why if missing)
Every save is timed until the data is on disk (os.sync() after the save returns; overdrive
and DCP also fsync their files). Loads read a file just written, so they mostly come from
the page cache: load MB/s measures deserialisation more than the disk.
Then rt.save on 2 ranks (torchrun, a fully_shard-ed model: each rank writes half) vs 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ROOT, emit, target


def build_model():
    from overdrive.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, dim=768, n_layers=8, n_heads=12, ffn_dim=2048,
                      max_seq_len=256)
    torch.manual_seed(0)
    return Llama(cfg)


def _runtime(model):
    from overdrive.rewrite.report import Report
    from overdrive.plan import Plan
    from overdrive.runtime.runtime import Runtime
    from overdrive.runtime.state import env_for

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from overdrive.runtime.state import ensure_process_group
        ensure_process_group(torch.device("cpu"))
    env = env_for(Plan(), rank=int(os.environ.get("RANK", "0")), local_rank=0, world_size=world,
              device=torch.device("cpu"))
    return Runtime(model, plan=Plan(), report=Report([]), env=env)


def variants(model, rt):
    """name -> (save(dest), load(dest)); every save writes a fresh path, as a training
    run writes step-N after step-N-1 (removing old ones is not part of the timing)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}

    def touch(tensors):  # every variant's load ends with its bytes read into memory
        return sum(float(t.float().sum()) for t in tensors)

    def dcp_load(dest):
        target = {k: torch.empty_like(v) for k, v in sd.items()}
        dcp.load(target, checkpoint_id=str(dest), no_dist=True)
        touch(target.values())

    out = {
        "rt.save/rt.load": (lambda d: rt.save(d),
                            lambda d: (rt.load(d), touch(model.state_dict().values()))),
        "safetensors": (lambda d: save_file(sd, str(d)),
                        lambda d: touch(load_file(str(d)).values())),
        "torch.save": (lambda d: torch.save(sd, d),
                       lambda d: touch(torch.load(d, weights_only=True).values())),
        "dcp": (lambda d: dcp.save(sd, checkpoint_id=str(d), no_dist=True), dcp_load),
    }
    try:
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        amodel = acc.prepare(model)
        out["accelerate"] = (lambda d: acc.save_state(str(d)),
                             lambda d: (acc.load_state(str(d)),
                                        touch(amodel.state_dict().values())))
    except Exception as e:  # noqa: BLE001
        out["accelerate"] = f"not run: {type(e).__name__}: {e}"
    return out


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def timed(fn, sync: bool) -> float:
    t = time.perf_counter()
    fn()
    if sync:
        os.sync()
    return time.perf_counter() - t


def disk_write_MBps(base: Path, mb: int = 256, rounds: int = 3) -> float:
    """The disk's own ceiling: raw sequential writes of ``mb`` MB, fsynced (median)."""
    block = os.urandom(1 << 20)
    times = []
    for i in range(rounds):
        path = base / f"disk-{i}.bin"
        t = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t)
        path.unlink()
    return round(mb * (1 << 20) / 1e6 / statistics.median(times), 1)


def single_process(rounds: int, base: Path) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    model = build_model()
    mb = sum(v.numel() * v.element_size() for v in model.state_dict().values()) / 1e6
    rt = _runtime(model)
    vs = variants(model, rt)
    runnable = {k: v for k, v in vs.items() if not isinstance(v, str)}
    names = list(runnable)
    times = {k: {"save": [], "load": []} for k in runnable}
    for i, k in enumerate(names):  # warm-up (imports, first allocations)
        save, load = runnable[k]
        save(base / f"warm-{i}"), load(base / f"warm-{i}"), remove(base / f"warm-{i}")
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotating order
            save, load = runnable[k]
            dest = base / f"{names.index(k)}-{r}"
            times[k]["save"].append(timed(lambda: save(dest), sync=True))
            times[k]["load"].append(timed(lambda: load(dest), sync=False))
            remove(dest)
    rows = {}
    for k, v in vs.items():
        if isinstance(v, str):
            rows[k] = {"status": v}
            continue
        s, ld = statistics.median(times[k]["save"]), statistics.median(times[k]["load"])
        rows[k] = {"save_s": round(s, 4), "load_s": round(ld, 4), "save_MBps": round(mb / s, 1),
                   "load_MBps": round(mb / ld, 1), "save_s_all": [round(t, 3) for t in times[k]["save"]]}
    base_total = rows["safetensors"]["save_s"] + rows["safetensors"]["load_s"]
    for k, r in rows.items():
        if "save_s" in r:
            r["save+load_vs_safetensors"] = round((r["save_s"] + r["load_s"]) / base_total, 3)
    return {"model_MB": round(mb, 1), "params_M": round(mb / 4, 1), "rows": rows}


def worker(base: str, rounds: int, threads: int | None) -> None:
    """One rank of the multi-rank save benchmark (run by torchrun, or alone for 1 rank);
    ``threads`` overrides the writer threads per rank (default: ``io_threads()``)."""
    import warnings

    import torch.distributed as dist

    from overdrive.runtime import checkpoint

    warnings.filterwarnings("ignore")
    if threads:
        checkpoint.io_threads = lambda: threads
    model = build_model()
    rt = _runtime(model)
    if rt.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (rt.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    rt.save(Path(base) / "warm")
    times = []
    for i in range(rounds):
        rt.barrier()
        t = time.perf_counter()
        rt.save(Path(base) / f"r{i}")
        if rt.is_main:
            os.sync()
        rt.barrier()
        times.append(time.perf_counter() - t)
        if rt.is_main:  # removing it is not part of the save (as in single_process)
            remove(Path(base) / f"r{i}")
    if rt.is_main:
        print("RESULT " + json.dumps({"world": rt.world_size,
                                      "writer_threads": checkpoint.io_threads(),
                                      "save_s": statistics.median(times), "all": times}))
    if dist.is_initialized():
        dist.destroy_process_group()


def multi_rank(rounds: int, base: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    runs = {"1_rank": (1, None), "1_rank_1_thread": (1, 1), "2_rank": (2, None)}
    out = {}
    for name, (n, threads) in runs.items():
        d = base / name
        d.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", __file__, "--worker", str(d), "--rounds", str(rounds)]
        cmd += ["--threads", str(threads)] if threads else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            out[name] = {"status": f"failed: {proc.stderr[-600:]}"}
            continue
        out[name] = json.loads(line[0][7:])

    def speedup(one: str) -> float | None:
        if "save_s" in out[one] and "save_s" in out["2_rank"]:
            return round(out[one]["save_s"] / out["2_rank"]["save_s"], 3)
        return None

    out["speedup_2_vs_1"] = speedup("1_rank")
    out["speedup_2_vs_1_at_1_thread"] = speedup("1_rank_1_thread")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    if args.worker:
        worker(args.worker, rounds, args.threads)
        return
    base = Path(tempfile.mkdtemp(prefix="od-ckpt-bench-", dir=args.dir))
    try:
        (base / "single").mkdir()
        disk = disk_write_MBps(base)
        single = single_process(rounds, base / "single")
        multi = multi_rank(rounds, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = single["rows"]
    targets = [target("rt.save+rt.load / safetensors save+load (1 process)",
                      rows["rt.save/rt.load"]["save+load_vs_safetensors"], 1.5)]
    targets += [target(f"{k} save+load / safetensors' (reference, no target)",
                       r["save+load_vs_safetensors"], None)
                for k, r in rows.items() if k not in ("rt.save/rt.load", "safetensors")
                and "save+load_vs_safetensors" in r]
    one_rank = multi.get("1_rank", {}).get("save_s")
    targets.append(target("1-rank rt.save MB/s / raw fsynced disk writes (reference: ~1 "
                          "means the disk is the limit)",
                          single["model_MB"] / one_rank / disk if one_rank else None, None))
    targets.append(target("rt.save speedup, 2 ranks vs 1", multi.get("speedup_2_vs_1"), 1.0,
                          ">"))
    targets.append(target("rt.save speedup, 2 ranks vs 1, one writer thread per rank "
                          "(reference: the per-rank parallel write at equal cores per rank)",
                          multi.get("speedup_2_vs_1_at_1_thread"), None))
    emit("checkpoint_io", {
        "rounds": rounds, "disk_write_MBps_fsynced": disk, "single_process": single,
        "multi_rank_rt_save": multi,
        "targets": targets,
        "notes": "weights only (no optimizer) so every variant writes the same bytes; "
                 "saves timed to disk (os.sync), loads mostly from the page cache; "
                 "the machine's CPUs and disk are shared, expect noise",
    })


if __name__ == "__main__":
    main()
