"""The planner: predicted memory, communication and step time for every layout of a
model on a world of ranks, checked by the real passes (docs/planner.md)."""

from .candidate import Candidate, Candidates
from .hardware import HARDWARE, Hardware
from .search import plan

__all__ = ["plan", "Candidate", "Candidates", "Hardware", "HARDWARE"]
