"""Rebuild the results section of benchmarks/README.md and its plots from results/*.json.

    python benchmarks/report.py

The table lists every row of every result's ``targets`` (what was measured, the value,
the target, met or not) with the machine each result ran on, so the README can never
drift from the JSON. Plots (matplotlib, skipped with a note when it is missing):
results/compile_time.png (cold start and steady step per variant and block count) and
results/step_overhead.png (median step time per variant).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ORDER = ["compile_time", "compile_warm_start", "step_overhead", "step_overhead_dist",
         "checkpoint_io", "memory", "casting", "fp8", "inspect_speed", "gpu_check"]


def load_results() -> dict[str, dict]:
    found = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    return {name: found[name] for name in ORDER + sorted(set(found) - set(ORDER))
            if name in found}


# results that are not named after their script
SCRIPT_OF = {"step_overhead_dist": "step_overhead.py (2 ranks)",
             "compile_warm_start": "compile_time.py --warm-start"}


def machine_line(m: dict) -> str:
    flags = f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
    where = m.get("gpu") or f"{m.get('cpu', '?')}{flags}, {m.get('cores', '?')} cores"
    return f"{where}, torch {m.get('torch', '?')}, Python {m.get('python', '?')}"


def machine_kind(m: dict | None) -> str:
    """The short name of the machine a row ran on: the GPU, or the CPU and the flags
    that change its numbers (bf16 matmul units)."""
    if not m:
        return "?"
    if m.get("gpu"):
        return m["gpu"]
    flags = [f for f in m.get("cpu_flags", []) if f in ("avx512_bf16", "amx_bf16")]
    return f"{m.get('cpu', '?')} ({', '.join(flags) or 'no bf16 units'})"


def verdict(met) -> str:
    return {True: "met", False: "**not met**", None: "—"}[met]


def table(results: dict[str, dict]) -> str:
    lines = ["| script | machine | measured | value | target | |",
             "|---|---|---|---|---|---|"]
    for name, res in results.items():
        script = SCRIPT_OF.get(name, f"{name}.py")
        kind = machine_kind(res.get("machine"))
        rows = res.get("targets")
        if not isinstance(rows, list):  # written by an older version of the script
            lines.append(f"| {script} | {kind} | (result predates the targets list: rerun it)"
                         " | | | |")
            continue
        for row in rows:
            value = "n/a" if row["value"] is None else f"{row['value']:g}"
            target = row["target"] if not row["target"].endswith("None") else "—"
            lines.append(f"| {script} | {kind} | {row['name']} | {value} | {target} | "
                         f"{verdict(row['met'])} |")
    machines = sorted({machine_line(r["machine"]) for r in results.values() if "machine" in r})
    lines.append("")
    lines.append("Machine: " + "; ".join(machines) + ".")
    return "\n".join(lines)


def plot_compile_time(res: dict, plt) -> str | None:
    by_blocks = res.get("by_blocks", {})
    if not by_blocks:
        return None
    blocks = sorted(by_blocks, key=int)
    variants = [v for v in ("eager", "full", "regional", "per_block", "accelerate")
                if any(v in by_blocks[b]["variants"] for b in blocks)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(variants)
    for ax, key, title in ((axes[0], "cold_s", "cold start: first forward+backward (s)"),
                           (axes[1], "steady_s", "steady step (s)")):
        for i, v in enumerate(variants):
            ys = [by_blocks[b]["variants"].get(v, {}).get(key) or 0 for b in blocks]
            xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(blocks))]
            ax.bar(xs, ys, width, label=v)
        ax.set_xticks(range(len(blocks)), [f"{b} blocks" for b in blocks])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "compile_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_step_overhead(results: dict, plt) -> str | None:
    runs = [(n, results[n]) for n in ("step_overhead", "step_overhead_dist") if n in results]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], runs):
        rows = [r for r in res["rows"] if "median_us" in r]
        labels = [f"{r['variant']} ×{r['grad_accum']}" for r in rows]
        ax.bar(range(len(rows)), [r["median_us"] for r in rows],
               color=[{"overdrive": "C2", "accelerate": "C3"}.get(r["variant"], "C0")
                      for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=35, ha="right")
        ax.set_title(f"median step (µs), {res['processes']} process(es); ×N = grad_accum",
                     fontsize=10)
    fig.tight_layout()
    path = RESULTS / "step_overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(results: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = [plot_compile_time(results["compile_time"], plt) if "compile_time" in results
            else None, plot_step_overhead(results, plt)]
    return [m for m in made if m]


def main() -> None:
    results = load_results()
    section = [BEGIN, "", table(results), ""]
    images = plots(results)
    section += [f"![{Path(i).stem}](results/{i})" for i in images] or \
        ["(plots need matplotlib: `pip install overdrive[bench]`)"]
    section += ["", END]
    text = README.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{README} has no {BEGIN} … {END} section")
    README.write_text(pattern.sub(lambda _: "\n".join(section), text))
    print(f"updated {README} from {len(results)} result(s); plots: {', '.join(images) or 'none'}")


if __name__ == "__main__":
    main()
