"""Known-harmless log lines of third-party imports, dropped where overdrive does the import.

Importing torchao (overdrive's fp8 pass does; transformers does too) logs, on a machine
without the matching GPU:

- ``Failed to load …/torchao/_C_mxfp8….so`` / ``_C_cutlass_90a….so``: CUDA-only kernels
  (Blackwell MXFP8, Hopper CUTLASS) that cannot load there and are never used there;
- torch's ``<enum …> is an Enum subclass … register_constant() on Enum subclasses is
  deprecated``: torchao registering its enums the old way.

``known_harmless_noise()`` filters exactly those records on exactly those two loggers for
the duration of a ``with`` block; nothing process-wide is changed, and every other record
(another library failing to load, any other deprecation) still shows.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from types import ModuleType
from typing import Iterator

HARMLESS: dict[str, re.Pattern] = {
    "torchao": re.compile(r"Failed to load .*/torchao/_C_(mxfp8|cutlass_90a)[^/]*\.so"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported .*"
                                      r"register_constant\(\) on Enum subclasses is deprecated",
                                      re.S),
}


class _Drop(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


@contextlib.contextmanager
def known_harmless_noise() -> Iterator[None]:
    """Drop the known-harmless records (see the module docstring) logged inside the block."""
    installed = [(logging.getLogger(name), _Drop(pattern)) for name, pattern in HARMLESS.items()]
    for logger, flt in installed:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger, flt in installed:
            logger.removeFilter(flt)


def quiet_import(name: str) -> ModuleType:
    """``importlib.import_module(name)`` without the known-harmless import noise."""
    with known_harmless_noise():
        return importlib.import_module(name)
