"""Stand-ins for built-in passes another branch provides, so the ordering constraints of
the passes tested here resolve on their own. A stand-in is never enabled, and once the
real pass is registered (after the branches merge) nothing is registered here."""

from __future__ import annotations

import contextlib

from overdrive.rewrite.manager import Pass, register_pass, registered_passes, unregister_pass

BUILT_INS = ("casting", "fp8", "tensor_parallel", "context_parallel", "checkpointing",
             "compile", "fsdp", "ddp", "deepspeed")


@contextlib.contextmanager
def missing_passes_stubbed():
    import overdrive.passes  # noqa: F401  (the real built-ins register first)

    added = [n for n in BUILT_INS if n not in registered_passes()]
    for name in added:
        register_pass(name)(type(f"Placeholder_{name}", (Pass,),
                                 {"enabled": lambda self, plan: False}))
    try:
        yield added
    finally:
        for name in added:
            unregister_pass(name)
