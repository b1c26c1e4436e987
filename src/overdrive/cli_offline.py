"""The offline subcommands' work, imported only when one runs (``overdrive --help`` and
the other subcommands never import torch or transformers through this module).

- ``overdrive export CHECKPOINT OUT``: runtime/checkpoint_export.py does the conversion.
- ``overdrive inspect --config config.json [--arch Class]``: a transformers model built on
  the meta device from a config file alone (no download, no weights) for the dry run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from .runtime.checkpoint_export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, config=args.config,
                      verify=not args.no_verify, overwrite=args.overwrite)
    return 0


def meta_model_from_config(config: str | Path, arch: str | None = None):
    """The transformers model ``arch`` (default: the config's ``architectures[0]``) with
    the config read from ``config`` (a config.json or a directory holding one), on meta."""
    import torch

    try:
        import transformers
    except ImportError:
        raise SystemExit("overdrive inspect --config builds a transformers model: "
                         "pip install transformers") from None

    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"overdrive inspect: --config {str(config)!r} is not a readable "
                         f"config.json ({type(e).__name__}: {e})") from None
    arch = arch or next(iter(data.get("architectures") or []), None)
    if arch is None:
        raise SystemExit(f"overdrive inspect: {path} names no architectures; pass --arch, "
                         "e.g. --arch LlamaForCausalLM")
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "config_class"):
        raise SystemExit(f"overdrive inspect: transformers has no model class {arch!r}; pass "
                         "--arch with a class name such as LlamaForCausalLM")
    hf_config = cls.config_class.from_dict(data)
    with torch.device("meta"):
        return cls(hf_config)
