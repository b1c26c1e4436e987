"""Rebuild the results section of benchmarks/README.md and its plots from results/*.json.

    python benchmarks/report.py

The table lists every row of every result's ``targets`` (what was measured, the value,
the target, met or not) with the machine each result ran on, so the README can never
drift from the JSON. Plots (matplotlib, skipped with a note when it is missing):
results/compile_time.png (cold start and steady step per variant and block count) and
results/step_overhead.png (each variant's step / the raw loop's, per workload and grad_accum).
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
    """Per case (workload × grad_accum), each variant's step / the raw loop's (paired)."""
    runs = [(n, results[n]) for n in ("step_overhead", "step_overhead_dist")
            if n in results and "cases" in results[n]]
    if not runs:
        return None
    variants = ["overdrive", "overdrive_no_ledger", "overdrive_unlogged", "overdrive_logged",
                "accelerate", "raw_again"]
    colors = {"overdrive": "C2", "overdrive_no_ledger": "C8", "overdrive_unlogged": "C9",
              "overdrive_logged": "C1", "accelerate": "C3", "raw_again": "C7"}
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], runs):
        cases = res["cases"]
        shown = [v for v in variants if any(v in c["variants"] for c in cases)]
        width = 0.8 / len(shown)
        for i, v in enumerate(shown):
            ys = [c["variants"].get(v, {}).get("ratio_vs_raw") or 0 for c in cases]
            xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, ys, width, label=v, color=colors[v])
        ax.axhline(1.0, color="k", lw=0.6)
        ax.axhline(1.01, color="C2", lw=0.6, ls="--")
        ax.set_ylim(0.9, max(1.1, max((c["variants"].get(v, {}).get("ratio_vs_raw") or 0)
                                      for c in cases for v in shown) + 0.02))
        ax.set_xticks(range(len(cases)), [f"{c['workload']} ×{c['grad_accum']}\n"
                                          f"{c['raw_median_us'] / 1000:.1f} ms" for c in cases],
                      fontsize=8)
        ax.set_title(f"step / raw loop's (CPU time, paired), {res['processes']} process(es); "
                     "×N = grad_accum", fontsize=9)
        ax.legend(fontsize=7)
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
