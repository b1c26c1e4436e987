"""The ``overdrive`` command: inspect, plan, export, launch, plot, env.

Benchmarks are not a subcommand: they live in the repository (`benchmarks/run_all.py`,
`make bench`), beside the baselines they compare against, not in the installed package.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from typing import Any, Callable


def load_factory(spec: str) -> Callable[[], Any]:
    """``pkg.module:factory`` (or ``path/to/file.py:factory``) → the callable."""
    if ":" not in spec:
        raise SystemExit(f"overdrive: expected MODULE:FACTORY, got {spec!r} "
                         "(e.g. overdrive.models.llama:llama3_8b)")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location("_overdrive_user_module", mod_name)
        if loader is None:
            raise SystemExit(f"overdrive: cannot load {mod_name!r}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(mod_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"overdrive: {mod_name!r} has no attribute {attr!r}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    import overdrive as od

    if args.config is not None:
        from .cli_offline import meta_model_from_config

        model = meta_model_from_config(args.config, args.arch)
    elif args.model is None:
        raise SystemExit("overdrive inspect: give MODULE:FACTORY or --config config.json")
    else:
        factory = load_factory(args.model)
        with torch.device("meta"):
            model = factory()
    report = od.inspect(model, args.plan, world_size=args.world_size)
    print(report.to_json() if args.json else report)
    return 0


def batch_arg(value: str) -> tuple[int, int]:
    """``512x4096`` → (global batch size, sequence length)."""
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--batch {value!r}: give GLOBAL_BATCHxSEQ_LEN, e.g. 512x4096")
    return int(parts[0]), int(parts[1])


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    import overdrive as od

    factory = load_factory(args.model)
    with torch.device("meta"):
        model = factory()
    allow = json.loads(args.allow) if args.allow else None
    candidates = od.plan(model, world_size=args.world_size, memory_per_rank=args.memory,
                         batch=args.batch, hardware=args.hardware, allow=allow, top=args.top,
                         objective=args.objective)
    if args.json:
        print(json.dumps([{"layout": c.layout.name(), "plan": c.plan.to_dict(),
                           "micro_batch": c.layout.micro_batch,
                           "grad_accum": c.layout.grad_accum,
                           "memory": c.memory.as_dict(), "comm": c.comm,
                           "step_seconds": c.step_seconds,
                           "tokens_per_second_per_gpu": c.tokens_per_second_per_gpu,
                           "mfu": c.mfu, "why": c.why} for c in candidates], indent=2,
                         default=str))
    else:
        print(candidates)
    return 0


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What a bug report needs: versions, devices, optional backends."""
    import torch

    info: dict[str, Any] = {
        "overdrive": _version("overdrive") or "source checkout",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
        "distributed_backends": {b: getattr(torch.distributed, f"is_{b}_available", lambda: False)()
                                 for b in ("gloo", "nccl", "mpi")},
    }
    for name, dist_name in (("torchao", "torchao"), ("transformer_engine", "transformer-engine"),
                            ("deepspeed", "deepspeed"), ("transformers", "transformers"),
                            ("accelerate", "accelerate"), ("safetensors", "safetensors"),
                            ("networkx", "networkx")):
        info[name] = _version(dist_name)
    return info


def cmd_env(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            shown = "not installed" if value is None else value
            print(f"{key.ljust(width)}  {shown}")
    return 0


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The ``python -m torch.distributed.run …`` command ``overdrive launch`` runs."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if args.nnodes == "1" and args.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if args.rdzv_endpoint is None:
            raise SystemExit("overdrive launch: --nnodes > 1 needs --rdzv-endpoint HOST:PORT "
                             "(the address of one node, the same on every node)")
        cmd += [f"--nnodes={args.nnodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
        if args.node_rank is not None:
            cmd.append(f"--node-rank={args.node_rank}")
    cmd += [f"--nproc-per-node={args.nproc}", f"--max-restarts={args.max_restarts}"]
    return cmd + [args.script, *args.script_args]


def launch_env(nproc: int) -> dict[str, str]:
    """The environment of the ranks: OMP_NUM_THREADS = cores / processes unless set."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, nproc)))
    return env


def nproc_arg(value: str) -> str:
    """``--nproc``: "auto" or a positive number of processes."""
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a number of processes; give a "
                                     "positive integer such as 2, or auto")


def cmd_launch(args: argparse.Namespace) -> int:
    import shlex

    from .launcher import run_owned

    if args.nproc == "auto":
        import torch

        args.nproc = str(torch.cuda.device_count() or 1)
    cmd = torchrun_command(args)
    env = launch_env(int(args.nproc))
    if args.dry_run:
        print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {shlex.join(cmd)}")
        return 0
    return run_owned(cmd, env)  # signals passed on; no worker outlives the launcher


def _cmd_export(args: argparse.Namespace) -> int:
    from .cli_offline import cmd_export

    return cmd_export(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_runs  # matplotlib is imported only here

    out = plot_runs(args.run_dirs, args.out, labels=args.label)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overdrive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="dry-run a plan on a meta-device model; print the report")
    p.add_argument("model", nargs="?", default=None,
                   help="MODULE:FACTORY returning an nn.Module (built on meta)")
    p.add_argument("--config", default=None,
                   help="a transformers config.json (or its directory): build that model on "
                        "meta instead of MODULE:FACTORY, no download")
    p.add_argument("--arch", default=None,
                   help="with --config: the transformers class (default: the config's "
                        "architectures[0]), e.g. LlamaForCausalLM")
    p.add_argument("--plan", default=None, help="preset (fsdp+compile), YAML or JSON path")
    p.add_argument("--world-size", type=int, default=None, help="ranks to plan for")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="rank the layouts that fit N ranks of M bytes: predicted "
                                    "memory, communication, step time (model on meta)")
    p.add_argument("model", help="MODULE:FACTORY returning an nn.Module (built on meta)")
    p.add_argument("--world-size", type=int, required=True, help="ranks to plan for")
    p.add_argument("--memory", default=None, help="memory per rank, e.g. 80GiB "
                                                  "(default: the hardware's)")
    p.add_argument("--batch", type=batch_arg, required=True,
                   help="GLOBAL_BATCHxSEQ_LEN, e.g. 512x4096")
    p.add_argument("--hardware", default="h100",
                   help="h100, h200, a100-80g, b200, mi300x or cpu")
    p.add_argument("--objective", default="throughput", choices=["throughput", "memory"])
    p.add_argument("--allow", default=None,
                   help='JSON restricting the search, e.g. \'{"tp": [1, 2, 4, 8], "fp8": false}\'')
    p.add_argument("--top", type=int, default=5, help="candidates to print")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="turn an rt.save checkpoint into a transformers "
                                      "safetensors directory, offline")
    p.add_argument("checkpoint", help="a directory written by rt.save (any world size, plan)")
    p.add_argument("out", help="the directory to write (model*.safetensors, config.json)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="cast floating tensors (default: as saved)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 2GB")
    p.add_argument("--config", default=None,
                   help="config.json to write when the checkpoint recorded none")
    p.add_argument("--no-verify", action="store_true",
                   help="check file sizes only, not their crc32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("launch", help="run a training script on several processes "
                                      "(torch.distributed.run underneath)")
    p.add_argument("--nproc", default="auto", type=nproc_arg,
                   help="processes per node (default: the GPUs, or 1 without any)")
    p.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for elastic runs")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous")
    p.add_argument("--rdzv-id", default="overdrive", help="job id shared by all nodes")
    p.add_argument("--max-restarts", type=int, default=0, help="elastic restarts on failure")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    p.add_argument("script", help="the training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("plot", help="loss, lr, tokens/s and memory against step from "
                                    "runs' metrics.jsonl, overlaid (needs matplotlib)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", default="plot.png", help="image to write (default plot.png)")
    p.add_argument("--label", action="append", default=None,
                   help="a legend label per run, in order (default: the directory names)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("env", help="versions and backends, for bug reports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    from .errors import OverdriveError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OverdriveError as err:
        print(f"overdrive: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
