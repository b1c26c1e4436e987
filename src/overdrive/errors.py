"""The errors overdrive raises. They are part of the public API.

A message names the field (or pass), the value that was refused and what would work.
"""


class OverdriveError(Exception):
    """Base class of every error overdrive raises on purpose."""


class PlanError(OverdriveError, ValueError):
    """The plan is malformed, contradictory, or does not fit the model / world size.

    Raised before any pass mutates the model: the model is left exactly as it was.
    """


class BackendUnavailable(OverdriveError, ImportError):
    """A pass needs a package or device that is not present (names the install extra)."""


class PassFailed(OverdriveError, RuntimeError):
    """A pass raised inside ``apply`` (any exception, an OverdriveError too: the model may
    be partly transformed by then). Names the pass and the modules it had touched
    (replaced, or changed in place); the original exception is ``__cause__``."""

    def __init__(self, pass_name: str, touched: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.touched = list(touched)
        shown = ", ".join(self.touched[:8]) + (" …" if len(self.touched) > 8 else "")
        super().__init__(
            f"pass '{pass_name}' failed: {type(cause).__name__}: {cause}. "
            f"It had touched {len(self.touched)} module(s){': ' + shown if shown else ''}; "
            "the model is partially transformed and should be rebuilt."
        )


class CheckpointError(OverdriveError, RuntimeError):
    """A checkpoint or weight export cannot be saved or loaded (base of the three below)."""


class NotACheckpoint(CheckpointError):
    """The path is not a complete overdrive checkpoint / safetensors export."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint does not fit this model / optimizer: lists missing, unexpected and
    differently-shaped keys."""


class CheckpointCorrupt(CheckpointError):
    """A file of the checkpoint is missing, truncated, corrupted or unsafe to read."""


class DesyncError(OverdriveError, RuntimeError):
    """The ranks stopped issuing the same collectives: one skipped or added one, called a
    collective helper (rt.save, rt.gather…) alone, or stood still while the others waited
    longer than ``desync_timeout``. Raised on every rank; names where each rank is."""


class NonFiniteError(OverdriveError, FloatingPointError):
    """A loss (``rt.backward``) or gradient norm (``rt.clip_grad_norm_``) is NaN or inf
    outside fp16; names the step. ``Plan(skip_nonfinite=True)`` skips such steps instead."""
