import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """A test that creates a 1-rank process group must not leak it into the next."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)


@pytest.fixture(autouse=True)
def _default_runs_outside_the_checkout(monkeypatch, tmp_path_factory):
    """od.accelerate's default run_dir is runs/<timestamp> in the working directory: tests
    that train in-process write theirs under pytest's temporary folder instead."""
    from overdrive.runtime import tracking

    original = tracking.default_run_dir
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setattr(tracking, "default_run_dir", lambda: base / original())
    monkeypatch.setattr(tracking, "ORIGINAL_DEFAULT_RUN_DIR", original, raising=False)


@pytest.fixture(autouse=True)
def _compile_cache_under_tmp(monkeypatch, tmp_path_factory):
    """Compile(cache=True)'s default dir is under the user's cache dir: tests keep theirs
    under pytest's temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
