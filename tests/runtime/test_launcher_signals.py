"""`overdrive launch` owns its workers: SIGTERM, SIGINT and SIGKILL to it leave no
process of the launch alive 10 s later. Each test lists the process tree before and
after (psutil)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tests.helpers import child_env

WORKER = """
import os, sys, time
from pathlib import Path
import torch
import overdrive as od

rt = od.accelerate(torch.nn.Linear(4, 1), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
Path(sys.argv[1], f"ready-{rt.rank}").write_text(str(os.getpid()))
x, y = torch.randn(8, 4), torch.randn(8, 1)
while True:
    rt.backward(torch.nn.functional.mse_loss(rt.model(x), y))
    rt.optimizer.step()
    rt.optimizer.zero_grad()
    time.sleep(0.05)
"""


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
        except psutil.NoSuchProcess:
            pass
    return out


def start(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    launcher = subprocess.Popen([sys.executable, "-m", "overdrive.cli", "launch", "--nproc",
                                 "2", str(script), str(tmp_path)],
                                env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not all((tmp_path / f"ready-{r}").exists() for r in range(2)):
        assert launcher.poll() is None, launcher.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.2)
    procs = tree(launcher.pid)
    workers = {int((tmp_path / f"ready-{r}").read_text()) for r in range(2)}
    assert workers <= {p.pid for p in procs}, "the workers are not in the launcher's tree"
    return launcher, procs


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_worker_outlives_a_signalled_launcher(tmp_path, sig):
    launcher, before = start(tmp_path)
    print("before:", *alive(before), sep="\n  ")
    assert len(alive(before)) >= 4  # launcher, torchrun, 2 workers
    launcher.send_signal(sig)
    deadline = time.monotonic() + 10
    while alive(before) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(before)
    print("after:", *left, sep="\n  ")
    for p in before:  # never leave a stray process behind a failing test
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    out = launcher.communicate(timeout=30)[0]
    assert not left, f"still alive 10 s after {sig.name}: {left}\n{out[-3000:]}"
    if sig != signal.SIGKILL:  # it waited for torchrun and reports the signal
        assert launcher.returncode == 128 + sig, (launcher.returncode, out[-3000:])
