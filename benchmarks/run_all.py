"""Run every benchmark, each in its own process, then rebuild benchmarks/README.md.

    python benchmarks/run_all.py [--quick] [--only compile_time step_overhead ...]

Each script prints one JSON object and writes benchmarks/results/<name>.json;
``step_overhead_dist`` is step_overhead.py under torchrun on 2 processes (gloo).
``report.py`` then turns the results into the README's table and plots.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["inspect_speed", "step_overhead", "step_overhead_dist", "checkpoint_io", "memory",
           "casting", "fp8", "compile_time", "pipeline", "offload"]
QUICK_ARGS = {"compile_time": ["--quick"], "checkpoint_io": ["--quick"],
              "step_overhead": ["--steps", "100"], "step_overhead_dist": ["--steps", "100"],
              "casting": ["--quick"], "fp8": ["--quick"], "memory": ["--quick"],
              "inspect_speed": ["--rounds", "1"], "pipeline": ["--quick"],
              "offload": ["--quick"]}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def command(name: str, quick: bool) -> list[str]:
    extra = QUICK_ARGS.get(name, []) if quick else []
    if name == "step_overhead_dist":
        return TORCHRUN + [str(HERE / "step_overhead.py"), "--dist"] + extra
    return [sys.executable, str(HERE / f"{name}.py")] + extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds / sizes")
    parser.add_argument("--only", nargs="*", default=None, choices=SCRIPTS)
    args = parser.parse_args()
    summary = {}
    for name in args.only or SCRIPTS:
        t0 = time.perf_counter()
        # two ranks on two cores: one thread each, or they fight over the cores
        env = dict(os.environ, OMP_NUM_THREADS="1") if name == "step_overhead_dist" else None
        proc = subprocess.run(command(name, args.quick), capture_output=True, text=True,
                              cwd=HERE, env=env)
        summary[name] = {"status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
                         "seconds": round(time.perf_counter() - t0, 1)}
        if proc.returncode != 0:
            summary[name]["stderr"] = proc.stderr[-2000:]
            print(proc.stderr[-2000:], file=sys.stderr)
        print(f"# {name}: {summary[name]['status']} in {summary[name]['seconds']} s",
              file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True)
    print(json.dumps(summary, indent=2))
    return 0 if all(v["status"] == "ok" for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
