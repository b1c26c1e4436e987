"""Checkpoint I/O: save and load MB/s of a ~100M-parameter model (weights only).

    python benchmarks/checkpoint_io.py [--quick] [--rounds N] [--dir DIR]

Variants, run alternately (rotating order each round) and reported as medians; every
save writes a fresh path, as training writes step-N after step-N-1:
  rt.save / rt.load          overdrive (DCP + manifest/crc32 + atomic rename)
  safetensors+copy           save_file / load_file + copy_ into the model (the baseline)
  safetensors                save_file / load_file, tensors summed, not copied (reference)
  torch.save                 torch.save / torch.load(weights_only=True) + copy_ into the model
  dcp                        torch.distributed.checkpoint.save / load into the model
  accelerate                 Accelerator.save_state / load_state (row says why if missing)
Every save is timed until its data is on disk: every file it wrote, and its directories,
are fsynced after the save returns (``fsync_tree``; overdrive and DCP fsync their files
inside the save already, so for them that pass finds nothing left to write). Not os.sync():
on a shared machine it also waits for every other process's dirty pages. Loads read a
file just written, so they mostly come from the page cache: load MB/s measures
deserialisation and memory bandwidth more than the disk. ``rt_load_reads`` says how
rt.load read its records (straight into the parameters, or not).
Then the training loop's stall under an async rt.save (``async_stall``), and rt.save on 2
ranks (torchrun, a fully_shard-ed model: each rank writes half) vs 1.
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


def _runtime(model, optimizer=None):
    from overdrive.rewrite.report import Report
    from overdrive.plan_spec import Plan
    from overdrive.runtime.runtime import Runtime
    from overdrive.runtime.state import env_for

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from overdrive.runtime.state import ensure_process_group
        ensure_process_group(torch.device("cpu"))
    env = env_for(Plan(), rank=int(os.environ.get("RANK", "0")), local_rank=0, world_size=world,
              device=torch.device("cpu"))
    return Runtime(model, plan=Plan(), report=Report([]), env=env, optimizer=optimizer)


def variants(model, rt):
    """name -> (save(dest), load(dest)); every save writes a fresh path, as a training
    run writes step-N after step-N-1 (removing old ones is not part of the timing).

    Every load ends with the checkpoint in the model's own parameters, except plain
    ``load_file``'s (a reference): its tensors are mmap-backed and are summed instead, so
    that their bytes are read at all."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    params = model.state_dict()  # the model's own tensors (the copies' destinations)

    def touch(tensors):
        return sum(float(t.float().sum()) for t in tensors)

    def into_model(tensors):
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)

    out = {
        "rt.save/rt.load": (lambda d: rt.save(d), lambda d: rt.load(d)),
        "safetensors+copy": (lambda d: save_file(sd, str(d)),
                             lambda d: into_model(load_file(str(d)))),
        "safetensors": (lambda d: save_file(sd, str(d)),
                        lambda d: touch(load_file(str(d)).values())),
        "torch.save": (lambda d: torch.save(sd, d),
                       lambda d: into_model(torch.load(d, weights_only=True))),
        "dcp": (lambda d: dcp.save(sd, checkpoint_id=str(d), no_dist=True),
                lambda d: dcp.load(params, checkpoint_id=str(d), no_dist=True)),
    }
    try:
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        acc.prepare(model)
        out["accelerate"] = (lambda d: acc.save_state(str(d)),
                             lambda d: acc.load_state(str(d)))
    except Exception as e:  # noqa: BLE001
        out["accelerate"] = f"not run: {type(e).__name__}: {e}"
    return out


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def fsync_tree(path: Path) -> None:
    """fsync ``path`` (a file, or every file and directory under it) and its parent."""
    paths = [path] if not path.is_dir() else [*sorted(path.rglob("*")), path]
    for p in [*paths, path.parent]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def timed(fn, sync: Path | None) -> float:
    """Seconds of ``fn()``, and of fsyncing what it wrote under ``sync`` (None: no sync)."""
    t = time.perf_counter()
    fn()
    if sync is not None:
        fsync_tree(sync)
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
    # One compute thread: on shared cores, copy_'s OpenMP threads spin-wait for each other,
    # which made the load_file + copy_ baseline 8-18x slower than alone (0.83 s vs 0.05 s)
    # while rt.load's preadv (no OpenMP) was not: a ratio about the machine, not the code.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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
            times[k]["save"].append(timed(lambda: save(dest), sync=dest))
            times[k]["load"].append(timed(lambda: load(dest), sync=None))
            remove(dest)
    rows = {}
    for k, v in vs.items():
        if isinstance(v, str):
            rows[k] = {"status": v}
            continue
        s, ld = statistics.median(times[k]["save"]), statistics.median(times[k]["load"])
        rows[k] = {"save_s": round(s, 4), "load_s": round(ld, 4), "save_MBps": round(mb / s, 1),
                   "load_MBps": round(mb / ld, 1), "save_s_all": [round(t, 3) for t in times[k]["save"]]}
    fair = rows["safetensors+copy"]
    for k, r in rows.items():
        if "save_s" in r:
            r["load_vs_safetensors+copy"] = round(r["load_s"] / fair["load_s"], 3)
            r["save+load_vs_safetensors+copy"] = round(
                (r["save_s"] + r["load_s"]) / (fair["save_s"] + fair["load_s"]), 3)
    reads = _read_counts(rt, base)
    torch.set_num_threads(threads)
    return {"model_MB": round(mb, 1), "params_M": round(mb / 4, 1), "rows": rows,
            "rt_load_reads": reads}


def _read_counts(rt, base: Path) -> dict:
    """How rt.load read the records (checkpoint_read.ReadCounts): straight into the
    parameters' storage, through a view's copy_, or unpickled."""
    import dataclasses

    from overdrive.runtime import checkpoint_files as cf

    seen = []
    read_data = cf.SafeReader.read_data

    def spy(self, plan, planner):
        seen.append(self)
        return read_data(self, plan, planner)

    cf.SafeReader.read_data = spy
    try:
        rt.save(base / "counts")
        rt.load(base / "counts")
    finally:
        cf.SafeReader.read_data = read_data
        remove(base / "counts")
    return dataclasses.asdict(seen[-1].counts)


def async_stall(rounds: int, base: Path, steps: int = 6) -> dict:
    """How long an async ``rt.save`` holds up a training loop, against a synced save.

    The loop trains the same model with AdamW through ``rt.optimizer`` (the checkpoint
    holds the weights and both moments: 3x the bytes of the rows above), one compute
    thread (of the machine's cores: the writer threads get the others, as next to a GPU
    job's loop). Each round times ``steps`` clean steps, then a synced ``rt.save`` (to disk,
    its files fsynced), then the loop with an async save: the ``rt.save(async_=True)`` call, every
    step taken while the background write runs, and the ``rt.wait_for_save()`` that
    publishes it. The stall is that window's time minus as many clean steps (the round's
    median, from steps before and after it): the staging copy, the publication, and
    whatever the writer threads take from the loop."""
    import warnings

    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_model()
    rt = _runtime(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    x = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        t = time.perf_counter()
        model(x, labels=x).loss.backward()
        rt.optimizer.step()
        rt.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for _ in range(3):
        step()
    rt.save(base / "warm", async_=True)
    rt.wait_for_save()
    remove(base / "warm")
    out = {"clean_step_s": [], "synced_save_s": [], "stall_s": [], "overlapped_steps": [],
           "overlapped_step_s": [], "save_call_s": [], "publish_s": []}
    for r in range(rounds):
        before = [step() for _ in range(steps)]
        out["synced_save_s"].append(timed(lambda: rt.save(base / f"sync-{r}"),
                                          sync=base / f"sync-{r}"))
        remove(base / f"sync-{r}")
        t = time.perf_counter()
        rt.save(base / f"async-{r}", async_=True)
        call = time.perf_counter() - t
        pending = rt._pending_save
        done = getattr(pending.future, "upload_completion", pending.future)
        overlapped = []
        while not done.done() and len(overlapped) < 200:
            overlapped.append(step())
        t = time.perf_counter()
        rt.wait_for_save()  # fsyncs the manifest, the marker and the rename
        publish = time.perf_counter() - t
        clean = statistics.median(before + [step() for _ in range(steps)])  # around it
        out["clean_step_s"].append(clean)
        out["stall_s"].append(call + sum(overlapped) - clean * len(overlapped) + publish)
        out["overlapped_steps"].append(len(overlapped))
        out["overlapped_step_s"].append(statistics.median(overlapped) if overlapped else clean)
        out["save_call_s"].append(call)
        out["publish_s"].append(publish)
        remove(base / f"async-{r}")
    torch.set_num_threads(threads)
    med = {k: round(statistics.median(v), 4) for k, v in out.items()}
    return {**{f"median_{k}": v for k, v in med.items()},
            "stall_vs_synced_save": round(med["stall_s"] / med["synced_save_s"], 3),
            "blocking_vs_synced_save": round((med["save_call_s"] + med["publish_s"])
                                             / med["synced_save_s"], 3),
            "overlapped_step_vs_clean": round(med["overlapped_step_s"] / med["clean_step_s"], 3),
            "rounds": {k: [round(x, 4) for x in v] for k, v in out.items()}}


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
        rt.save(Path(base) / f"r{i}")  # fsyncs every file it wrote before returning
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
        (base / "stall").mkdir()
        stall = async_stall(max(3, rounds // 2), base / "stall")
        multi = multi_rank(rounds, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = single["rows"]
    ours = rows["rt.save/rt.load"]
    targets = [
        target("rt.load / (safetensors load_file + copy_ into the model) (1 process)",
               ours["load_vs_safetensors+copy"], 1.5),
        target("rt.save+rt.load / safetensors save_file + load_file + copy_ (1 process; both "
               "saves fsynced: rt.save inside the call, save_file's file right after it)",
               ours["save+load_vs_safetensors+copy"], 1.2),
        target("rt.save / safetensors save_file + fsync (reference: the save half)",
               ours["save_s"] / rows["safetensors+copy"]["save_s"], None),
        target("async rt.save: training-loop stall / synced rt.save time",
               stall["stall_vs_synced_save"], 0.1),
        target("async rt.save: the loop blocked in the call and the publication / synced "
               "rt.save time (reference: the stall without the writer threads' share of the "
               "cores)", stall["blocking_vs_synced_save"], None),
        target("async rt.save: median training step while the background write runs / clean "
               "step (reference: the writers' share of the loop's cores)",
               stall["overlapped_step_vs_clean"], None),
        target("rt.save+rt.load / plain safetensors save+load, its load not copied into the "
               "model (reference, no target)",
               (ours["save_s"] + ours["load_s"]) / (rows["safetensors"]["save_s"]
                                                    + rows["safetensors"]["load_s"]), None),
    ]
    targets += [target(f"{k} save+load / safetensors+copy's (reference, no target)",
                       r["save+load_vs_safetensors+copy"], None)
                for k, r in rows.items()
                if k not in ("rt.save/rt.load", "safetensors", "safetensors+copy")
                and "save+load_vs_safetensors+copy" in r]
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
        "async_save_stall": stall, "multi_rank_rt_save": multi,
        "targets": targets,
        "notes": "weights only (no optimizer tensors) so every variant writes the same "
                 "bytes; saves timed to disk (every written file and directory fsynced: rt.save and "
                 "dcp inside the call, the others right after it), loads mostly from the page "
                 "cache and "
                 "into the model's parameters (plain safetensors: summed instead); the "
                 "machine's CPUs and disk are shared, expect noise",
    })


if __name__ == "__main__":
    main()
