"""`overdrive launch` owns its workers: nothing it started outlives it.

* SIGTERM / SIGINT / SIGHUP to the launcher are passed on to torchrun (started in a
  session of its own, so a terminal's Ctrl-C reaches it once), which stops the workers;
  the launcher exits after it with its exit status. A second signal, or torchrun still
  running ``KILL_AFTER`` s after the first, kills torchrun.
* The launcher SIGKILLed: torchrun gets SIGTERM from the kernel (Linux
  ``PR_SET_PDEATHSIG``, set between fork and exec) and stops the workers.
* torchrun SIGKILLed: each worker that built a runtime asked for the same signal on its
  parent's death (``die_with_parent``, under ``overdrive launch`` only); the ledger's
  watchdog also exits a worker whose launcher (``OVERDRIVE_LAUNCHER_PID``) is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

LAUNCHER_PID = "OVERDRIVE_LAUNCHER_PID"
KILL_AFTER = 8.0  # s torchrun gets to stop its workers after a forwarded signal
_PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _set_pdeathsig(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """In a worker started by ``overdrive launch``: SIGTERM when torchrun dies. A no-op
    elsewhere (a plain ``python`` or ``torchrun`` launch keeps the default)."""
    if os.environ.get(LAUNCHER_PID):
        _set_pdeathsig()


def run_owned(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun as a child this process owns; return its exit status."""
    env = {**env, LAUNCHER_PID: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=_set_pdeathsig if sys.platform.startswith("linux")
                            else None)
    received: list[int] = []
    killer: list[threading.Timer] = []

    def kill() -> None:
        if proc.poll() is None:
            proc.kill()

    def forward(signum, frame) -> None:
        received.append(signum)
        if len(received) > 1:
            kill()
            return
        if proc.poll() is None:
            proc.send_signal(signum)
        timer = threading.Timer(KILL_AFTER, kill)
        timer.daemon = True
        timer.start()
        killer.append(timer)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for timer in killer:
            timer.cancel()
    if received:
        return 128 + received[0]
    return rc if rc >= 0 else 128 - rc
