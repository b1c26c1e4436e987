"""The built-in passes, imported in canonical order (the tie-breaker of the sort):
casting → fp8 → tensor_parallel → context_parallel → checkpointing → compile →
fsdp | ddp | deepspeed. Importing a module registers its pass."""
from . import checkpointing  # noqa: F401
from . import compile  # noqa: F401
