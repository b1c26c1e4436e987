"""The built-in passes, imported in canonical order (the tie-breaker of the sort):
pipeline → casting → fp8 → tensor_parallel → context_parallel → checkpointing → compile →
mixed_precision → fsdp | ddp | deepspeed | offload. Importing a module registers its pass."""

from . import pipeline  # noqa: F401  (first: the stages are carved before the others)
from . import casting  # noqa: F401
from . import fp8  # noqa: F401
from . import tensor_parallel  # noqa: F401
from . import context_parallel  # noqa: F401
from . import checkpointing  # noqa: F401
from . import compile  # noqa: F401
from . import mixed_precision  # noqa: F401
from . import fsdp  # noqa: F401
from . import ddp  # noqa: F401
from . import deepspeed  # noqa: F401
from . import offload  # noqa: F401
