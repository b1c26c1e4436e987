"""Collectives in one process, batch-size search, progress, rank-0 printing and logging."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import overdrive as od
from overdrive.errors import OverdriveError
from overdrive.plan_spec import Plan, resolve_for_world
from overdrive.rewrite.report import Report
from overdrive.runtime.helpers import RankFilter
from overdrive.runtime.runtime import Runtime
from overdrive.runtime.state import env_for


def fake_rt(rank: int = 0, size: int = 1) -> Runtime:
    plan = resolve_for_world(Plan(seed=0), size)
    env = env_for(plan, rank=rank, local_rank=rank, world_size=size, device=torch.device("cpu"))
    return Runtime(torch.nn.Linear(2, 2), plan=plan, report=Report([]), env=env)


def test_single_process_collectives_are_identity_without_process_group():
    import torch.distributed as dist

    rt = od.accelerate(torch.nn.Linear(2, 2))
    x = {"a": torch.arange(3), "b": [torch.ones(2)]}
    assert rt.gather(x) is x and rt.reduce(x, "mean") is x and rt.broadcast(x) is x
    assert rt.pad_across_processes(x) is x
    assert rt.gather_object({"k": 1}) == [{"k": 1}] and rt.gather_object([1, 2]) == [1, 2]
    loader = rt.shard(DataLoader(TensorDataset(torch.arange(5)), batch_size=2))
    assert [v for (b,) in loader for v in rt.gather_for_metrics(b).tolist()] == [0, 1, 2, 3, 4]
    assert not dist.is_initialized()
    with pytest.raises(OverdriveError, match="choose one of: sum, mean, max, min"):
        rt.reduce(torch.ones(1), "avg")


def test_find_executable_batch_size_backs_off_by_a_tenth():
    tried = []

    @od.find_executable_batch_size(starting_batch_size=128)
    def train(batch_size, scale):
        tried.append(batch_size)
        if batch_size > 60:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if batch_size > 55:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")
        return batch_size * scale

    assert train(2) == 104
    assert tried == [128, 115, 103, 92, 82, 73, 65, 58, 52]


def test_find_executable_batch_size_errors_at_zero_and_passes_other_errors():
    def always(batch_size):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(RuntimeError, match="no batch size fits in memory"):
        od.find_executable_batch_size(always, starting_batch_size=4)()

    def broken(batch_size):
        raise ValueError("not an OOM")

    with pytest.raises(ValueError, match="not an OOM"):
        od.find_executable_batch_size(broken)()


def test_progress_print_and_main_process_first_by_rank(capsys):
    from tqdm.auto import tqdm

    items = [1, 2, 3]
    main, other = fake_rt(0, 2), fake_rt(1, 2)
    assert isinstance(main.progress(items, desc="x"), tqdm)
    assert other.progress(items) is items
    main.print("from rank 0")
    other.print("from rank 1")
    assert capsys.readouterr().out == "from rank 0\n"
    ran = []
    with fake_rt(0, 1).main_process_first():
        ran.append(1)
    assert ran == [1]


def test_only_rank_zero_logs_info_and_warnings():
    info = logging.LogRecord("overdrive", logging.INFO, "", 0, "m", None, None)
    warn = logging.LogRecord("overdrive", logging.WARNING, "", 0, "m", None, None)
    err = logging.LogRecord("overdrive", logging.ERROR, "", 0, "m", None, None)
    assert RankFilter(0).filter(info) and RankFilter(0).filter(warn)
    assert not RankFilter(1).filter(info) and not RankFilter(1).filter(warn)
    assert RankFilter(1).filter(err)


@pytest.fixture
def overdrive_logger():
    """The "overdrive" logger with a list of the records it lets through; restored after."""
    log = logging.getLogger("overdrive")
    saved = list(log.filters), list(log.handlers), log.level
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(f"{record.levelname}:{record.getMessage()}")

    log.addHandler(Keep())
    log.setLevel(logging.INFO)
    yield log, seen
    log.filters[:], log.handlers[:] = saved[0], saved[1]
    log.setLevel(saved[2])


def test_configure_logging_on_rank_one_logs_errors_only(overdrive_logger, monkeypatch):
    from overdrive.runtime.helpers import configure_logging

    log, seen = overdrive_logger
    monkeypatch.delenv("OVERDRIVE_LOG_ALL_RANKS", raising=False)
    configure_logging(1)
    log.info("i"), log.warning("w"), log.error("e")
    assert seen == ["ERROR:e"]
    configure_logging(0)  # reconfigured: the rank-1 filter is replaced, not stacked
    log.warning("w0")
    assert seen[-1] == "WARNING:w0"
    monkeypatch.setenv("OVERDRIVE_LOG_ALL_RANKS", "1")
    configure_logging(1)
    log.info("all")
    assert seen[-1] == "INFO:all"
