"""What the training loop calls after the rewrite."""

from .runtime import Runtime
from .state import Env

__all__ = ["Runtime", "Env"]
