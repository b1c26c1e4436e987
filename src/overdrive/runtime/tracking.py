"""Experiment tracking: ``od.accelerate(trackers=..., run_dir=..., run_config=...)``.

``resolve_tracking`` checks the arguments (names, installed packages) at ``od.accelerate``
time, before anything is mutated, and returns a ``TrackingConfig``. The runtime's
``Tracking`` owns the trackers on rank 0: they are opened at the first row (nothing is
written by a run that never logs), receive the run config and the resolved plan once, one
row per ``rt.log`` call (the step metrics' rows a flush at a time, ``Tracker.log_rows``),
and are finished by ``rt.finish()`` or at interpreter exit.

Built-in trackers: ``"jsonl"`` (``run_dir/metrics.jsonl``, no dependency),
``"tensorboard"``, ``"wandb"`` (``WANDB_MODE=offline`` is wandb's own switch),
``"mlflow"`` (a file store under ``run_dir/mlruns`` unless ``MLFLOW_TRACKING_URI`` is
set) and ``"trackio"``. A custom tracker subclasses ``od.Tracker``.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import math
import numbers
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..errors import BackendUnavailable, OverdriveError, PlanError
from .jsonl import Writer, encode_columns, frame, json_lines
from .rows import Rows, StepColumns

log = logging.getLogger("overdrive")


class Tracker:
    """Base class of a tracker: override ``log``, and ``log_config`` / ``finish`` if needed.

    ``log(metrics, step)`` gets a dict of Python floats (and ints) for one step;
    ``log_rows(rows)`` gets the rows of one flush, ``[(metrics, step), ...]`` in step
    order (by default it calls ``log`` for each; override it to write them at once);
    ``log_config(config)`` gets ``{"run_config": ..., "plan": ...}`` once, before the first
    row; ``finish()`` is called once at the end. Only rank 0's trackers are called. The
    dicts are the tracker's own copies: it may keep or change them.
    """

    name = "custom"

    def open(self, run_dir: Path) -> None:
        """Called once before the first ``log_config``; ``run_dir`` exists by then."""

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the run's configuration (once)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement log(metrics, step)")

    def log_rows(self, rows: list[tuple[dict[str, float], int]]) -> None:
        for metrics, step in rows:
            self.log(metrics, step)

    def finish(self) -> None:
        """Flush and close."""

    def _log_batch(self, rows: Rows) -> None:
        """``Tracking.log_rows``'s way in: ``log_rows`` with the tracker's own dicts."""
        self.log_rows(rows.pairs())


# --------------------------------------------------------------------------- built-ins


class JsonlTracker(Tracker):
    """``run_dir/metrics.jsonl``: one JSON object a line (``{"step": N, ...}``) and the
    config in ``run_dir/config.json``. Buffered; flushed at least once a second.

    A flush of ``WRITER_MIN_ROWS`` rows or more (a loop logging over a hundred rows a
    second, where formatting them would be a share of the step) moves the writing to a
    helper process (``jsonl.Writer``), fed the step metrics' columns as raw numbers; where
    that process cannot start, or stops, the rows are written here as before."""

    name = "jsonl"

    def __init__(self):
        self._path: Path | None = None
        self._file = None
        self._flushed = 0.0
        self._writer: Writer | None = None
        self._inline = False  # True: never (again) a writer process

    def open(self, run_dir: Path) -> None:
        self._path = run_dir / "metrics.jsonl"
        self._file = open(self._path, "a", encoding="utf-8")
        self._flushed = time.monotonic()

    def log_config(self, config: dict[str, Any]) -> None:
        if self._path is not None:
            self._path.with_name("config.json").write_text(
                json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._log_batch(Rows([(metrics, step)]))

    def log_rows(self, rows: list[tuple[dict[str, float], int]]) -> None:
        self._log_batch(Rows(list(rows)))

    def _log_batch(self, rows: Rows) -> None:
        if self._writer is None and not self._inline and len(rows) >= WRITER_MIN_ROWS:
            self._start_writer()
        if self._writer is not None:
            try:
                self._writer.send(_writer_frames(rows))
                return
            except OSError as err:
                self._lose_writer(err)
        self._file.write(json_lines(rows.pairs()))
        now = time.monotonic()
        if now - self._flushed >= 1.0:
            self._file.flush()
            self._flushed = now

    def _start_writer(self) -> None:
        self._file.close()  # what was written here is on disk before the child appends
        self._file = None
        try:
            self._writer = Writer(self._path)
        except OSError as err:
            log.debug("overdrive: metrics.jsonl is written in this process (no writer "
                      "process: %s)", err)
            self._reopen()

    def _lose_writer(self, err: OSError) -> None:
        log.warning("overdrive: the process writing %s stopped (%s: %s); the rows are "
                    "written in this process from now on, the last ones sent to it may "
                    "be missing", self._path, type(err).__name__, err)
        self._writer.kill()
        self._writer = None
        self._reopen()

    def _reopen(self) -> None:
        self._inline = True
        self._file = open(self._path, "a", encoding="utf-8")

    def finish(self) -> None:
        if self._writer is not None:
            problem = self._writer.close(WRITER_FINISH_WAIT_S)
            self._writer = None
            if problem is not None:
                log.warning("overdrive: %s may miss its last rows: %s", self._path, problem)
        if self._file is not None:
            self._file.close()
            self._file = None


# a flush of this many rows moves metrics.jsonl's writing to a helper process
WRITER_MIN_ROWS = 64
WRITER_FINISH_WAIT_S = 10.0  # rt.finish()'s wait for the writer process


def _writer_frames(rows: Rows) -> bytes:
    """The writer process's frames of ``rows``: the step metrics' columns as numbers,
    any other row (and columns that are not all floats) as its text."""
    out = []
    for segment in rows.segments:
        if isinstance(segment, StepColumns):
            data = encode_columns(segment.steps, segment.columns)
            out.append(data if data is not None else
                       frame(b"T", json_lines(segment.pairs()).encode("utf-8")))
        else:
            out.append(frame(b"T", json_lines([segment]).encode("utf-8")))
    return b"".join(out)


class TensorBoardTracker(Tracker):
    """Event files under ``run_dir/tensorboard`` (``tensorboard --logdir RUN_DIR``)."""

    name = "tensorboard"

    def __init__(self):
        self._writer = None

    def open(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_config(self, config: dict[str, Any]) -> None:
        text = json.dumps(config, indent=2, default=str)
        self._writer.add_text("config", f"```\n{text}\n```", global_step=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbTracker(Tracker):
    """A wandb run in ``run_dir`` (project from ``WANDB_PROJECT``, default "overdrive");
    ``WANDB_MODE=offline`` writes it locally for a later ``wandb sync``."""

    name = "wandb"

    def __init__(self):
        self._run = None

    def open(self, run_dir: Path) -> None:
        import wandb

        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "overdrive"),
                               name=run_dir.name, dir=str(run_dir), reinit="create_new")

    def log_config(self, config: dict[str, Any]) -> None:
        self._run.config.update(config, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MlflowTracker(Tracker):
    """An MLflow run through ``MlflowClient`` (no global active run): a local SQLite store
    ``run_dir/mlflow.db`` with artifacts in ``run_dir/mlartifacts`` (``mlflow ui
    --backend-store-uri sqlite:///RUN_DIR/mlflow.db``) unless ``MLFLOW_TRACKING_URI`` is
    set; experiment "overdrive" (``MLFLOW_EXPERIMENT_NAME`` overrides)."""

    name = "mlflow"

    def __init__(self):
        self._client = self._run_id = None

    def open(self, run_dir: Path) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            artifacts = (run_dir / "mlartifacts").resolve().as_uri()
        self._client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "overdrive")
        experiment = self._client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else \
            self._client.create_experiment(name, artifact_location=artifacts)
        self._run_id = self._client.create_run(exp_id, run_name=run_dir.name).info.run_id

    def log_config(self, config: dict[str, Any]) -> None:
        self._client.log_dict(self._run_id, config, "config.json")
        flat = _flatten(config.get("run_config") or {})
        for key, value in list(flat.items())[:100]:
            self._client.log_param(self._run_id, key, str(value)[:500])

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.log_rows([(metrics, step)])

    def log_rows(self, rows: list[tuple[dict[str, float], int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step)
                 for metrics, step in rows for key, value in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit of metrics per log_batch
            self._client.log_batch(self._run_id, metrics=batch[i:i + 1000])

    def finish(self) -> None:
        if self._client is not None:
            self._client.set_terminated(self._run_id)
            self._client = None


class TrackioTracker(Tracker):
    """A trackio run (project from ``TRACKIO_PROJECT``, default "overdrive")."""

    name = "trackio"

    def __init__(self):
        self._trackio = None
        self._name = None

    def open(self, run_dir: Path) -> None:
        import trackio

        self._trackio, self._name = trackio, run_dir.name

    def log_config(self, config: dict[str, Any]) -> None:
        self._trackio.init(project=os.environ.get("TRACKIO_PROJECT", "overdrive"),
                           name=self._name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._trackio.log(metrics, step=step)

    def finish(self) -> None:
        if self._trackio is not None:
            self._trackio.finish()
            self._trackio = None


@dataclass(frozen=True)
class _BuiltIn:
    cls: type
    module: str | None  # the package it imports (None: no dependency)
    extra: str | None


BUILT_IN = {
    "jsonl": _BuiltIn(JsonlTracker, None, None),
    "tensorboard": _BuiltIn(TensorBoardTracker, "tensorboard", "tensorboard"),
    "wandb": _BuiltIn(WandbTracker, "wandb", "wandb"),
    "mlflow": _BuiltIn(MlflowTracker, "mlflow", "mlflow"),
    "trackio": _BuiltIn(TrackioTracker, "trackio", "trackio"),
}


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class TrackingConfig:
    """What ``od.accelerate``'s tracking arguments resolved to (checked, nothing opened)."""

    trackers: tuple = ()  # built-in names and Tracker instances
    run_dir: Path | None = None  # None: runs/<timestamp>, chosen when first written
    run_config: Any = None
    log_every: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.trackers)


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def resolve_tracking(trackers: Any, run_dir: Any, run_config: Any,
                     log_every: Any) -> TrackingConfig:
    """Check ``od.accelerate``'s tracking arguments; raises before anything is mutated."""
    if trackers is None:
        trackers = ()
    if isinstance(trackers, (str, Tracker)):
        trackers = (trackers,)
    if not isinstance(trackers, Iterable):
        raise PlanError(f"trackers={trackers!r}: give a tuple of names ({', '.join(BUILT_IN)}) "
                        "or od.Tracker instances, e.g. trackers=('jsonl', 'tensorboard')")
    out = []
    for t in trackers:
        if isinstance(t, Tracker):
            out.append(t)
            continue
        if not isinstance(t, str) or t not in BUILT_IN:
            raise PlanError(f"trackers: {t!r} is not a tracker; use one of "
                            f"{', '.join(repr(n) for n in BUILT_IN)} or an od.Tracker instance")
        spec = BUILT_IN[t]
        if spec.module is not None and importlib.util.find_spec(spec.module) is None:
            raise BackendUnavailable(
                f"trackers: {t!r} needs the {spec.module} package, which is not installed; "
                f"pip install 'overdrive[{spec.extra}]', or leave {t!r} out of trackers=")
        if t not in out:
            out.append(t)
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
        raise PlanError(f"log_every={log_every!r}: give a number of optimizer steps "
                        "(1 = every step, 0 = no built-in step metrics)")
    if run_config is not None and not isinstance(run_config, dict):
        raise PlanError(f"run_config={type(run_config).__name__}: give a dict (e.g. "
                        "vars(args)) or None")
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
        raise PlanError(f"run_dir={run_dir!r}: give a directory path or None "
                        "(runs/<timestamp>)")
    return TrackingConfig(tuple(out), Path(run_dir) if run_dir is not None else None,
                          run_config, log_every if out else 0)


# --------------------------------------------------------------------------- the runtime's


class Tracking:
    """Rank 0's trackers for one runtime; ``rt.log`` / ``rt.finish`` call into it."""

    def __init__(self, config: TrackingConfig, *, is_main: bool, plan: Any):
        self.config = config
        self.active = config.enabled and is_main
        self.run_dir: Path = config.run_dir or default_run_dir()  # made at the first row
        self._plan = plan
        self._trackers: list[Tracker] = []
        self._opened = self._finished = False
        # set by the step meter: its last rows come before the trackers close, and rt.log
        # rows wait behind the step rows recorded before them
        self.before_finish: Callable[[], None] | None = None
        self.hold: Callable[[dict, int], bool] | None = None

    # -- lifecycle ----------------------------------------------------------------
    def _open(self) -> None:
        self.run_dir = _fresh_dir(self.run_dir, self.config.run_dir)
        self._trackers = [t if isinstance(t, Tracker) else BUILT_IN[t].cls()
                          for t in self.config.trackers]
        config = {"run_config": _plain(self.config.run_config), "plan": self._plan.to_dict()}
        for tracker in self._trackers:
            tracker.open(self.run_dir)
            tracker.log_config(_plain(config))  # each its own copy
        self._opened = True
        # a weak reference: the exit hook never keeps a finished run alive
        atexit.register(_finish_at_exit, weakref.ref(self))

    def finish(self) -> None:
        if self._finished:
            return
        before, self.before_finish = self.before_finish, None
        if before is not None:
            before()
        self._finished = True
        if not self._opened:
            return
        for tracker in self._trackers:
            try:
                tracker.finish()
            except Exception as err:  # noqa: BLE001 — one tracker must not block the others
                log.error("overdrive: tracker %s failed to finish: %s",
                          getattr(tracker, "name", type(tracker).__name__), err)

    # -- rows ---------------------------------------------------------------------
    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        row = to_floats(metrics)
        if self.hold is not None and not self._finished and self.hold(row, step):
            return
        self.log_row(row, step)

    def log_row(self, row: dict[str, float], step: int) -> None:
        """A row of Python numbers: straight to the trackers."""
        self.log_rows(Rows([(row, step)]))

    def log_rows(self, rows: Rows) -> None:
        """Rows of Python numbers (a flush of the step metrics): to each tracker at once."""
        if self._finished:
            raise OverdriveError("rt.log after rt.finish(): the trackers are closed; log "
                                 "before finishing, or accelerate a new runtime for a new run")
        if not self._opened:
            self._open()
        for tracker in self._trackers:
            tracker._log_batch(rows)  # each makes its own dicts


def _finish_at_exit(ref) -> None:
    tracking = ref()
    if tracking is not None:
        tracking.finish()


def _fresh_dir(path: Path, given: Path | None) -> Path:
    """The run directory: a given one is used as is (appended to); the default
    runs/<timestamp> gets a -1, -2… suffix when that second is taken."""
    if given is None:
        base, n = path, 0
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Python numbers from ``metrics``; tensors are read with one device→host copy."""
    if not isinstance(metrics, dict):
        raise OverdriveError(f"rt.log(metrics={type(metrics).__name__}): give a dict of "
                             "name → number or one-element tensor")
    row: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise OverdriveError(f"rt.log: metric names are strings, got {key!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise OverdriveError(f"rt.log: {key!r} is a tensor of shape "
                                     f"{tuple(value.shape)}; log a single number "
                                     "(e.g. its .mean())")
            tensors[key] = value.detach().reshape(())
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise OverdriveError(f"rt.log: {key!r} = {value!r} is not a number; log ints, "
                                 "floats or one-element tensors")
        else:
            row[key] = value if type(value) in (int, float) else \
                (int(value) if isinstance(value, numbers.Integral) else float(value))
    if tensors:
        if len(tensors) == 1:
            (key, t), = tensors.items()
            values = [t.float().item()]
        else:
            dev = next(iter(tensors.values())).device
            values = torch.stack([t.float().to(dev) for t in tensors.values()]).tolist()
        row.update(zip(tensors, values))
    return row


def _plain(obj: Any) -> Any:
    """A JSON-friendly deep copy: dicts, lists and scalars rebuilt, the rest as str."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
