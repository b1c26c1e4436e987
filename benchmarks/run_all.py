"""Run every benchmark, each in its own process, and summarise their JSON.

    python benchmarks/run_all.py [--quick] [--only compile_time step_overhead ...]

Each script prints one JSON object and writes benchmarks/results/<name>.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["inspect_speed", "step_overhead", "checkpoint_io", "memory", "casting", "fp8",
           "compile_time"]
QUICK_ARGS = {"compile_time": ["--quick"], "checkpoint_io": ["--quick"],
              "step_overhead": ["--quick"], "casting": ["--quick"], "fp8": ["--quick"],
              "memory": ["--quick"], "inspect_speed": ["--rounds", "1"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds / sizes")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    summary = {}
    for name in args.only or SCRIPTS:
        script = HERE / f"{name}.py"
        if not script.exists():
            summary[name] = {"status": "missing"}
            continue
        cmd = [sys.executable, str(script)] + (QUICK_ARGS.get(name, []) if args.quick else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
        summary[name] = {"status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
                         "seconds": round(time.perf_counter() - t0, 1)}
        if proc.returncode != 0:
            summary[name]["stderr"] = proc.stderr[-2000:]
            print(proc.stderr[-2000:], file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0 if all(v["status"] == "ok" for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
