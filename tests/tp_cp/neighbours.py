"""tensor_parallel / context_parallel declare their order against fp8 and checkpointing.
Until those passes are merged into the same tree, register disabled stand-ins so the
ordering names resolve; once the real passes exist this does nothing."""

from overdrive.rewrite.manager import Pass, register_pass, registered_passes

NEIGHBOURS = ("fp8", "checkpointing")


def ensure_neighbour_passes() -> None:
    for name in NEIGHBOURS:
        if name not in registered_passes():
            cls = type(f"_Absent_{name}", (Pass,), {"enabled": lambda self, plan: False})
            register_pass(name)(cls)
