"""Shared test helpers: torchrun launches of small scripts, model fingerprints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(ROOT)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OVERDRIVE_PG_TIMEOUT", "120")
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    env.pop("MASTER_ADDR", None), env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def run_torchrun(script: str | Path, nproc: int, *args: str, tmp_path: Path | None = None,
                 timeout: float = 300, check: bool = True, env: dict | None = None
                 ) -> subprocess.CompletedProcess:
    """Run ``script`` (a path, or source text written to ``tmp_path``) on ``nproc`` CPU
    processes with torchrun (gloo). Fails the test with the output when a rank fails."""
    if isinstance(script, str) and "\n" in script:
        assert tmp_path is not None, "inline scripts need tmp_path"
        path = tmp_path / "script.py"
        path.write_text(textwrap.dedent(script))
        script = path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(script), *args]
    proc = subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=str(tmp_path or ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} (nproc={nproc}) exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a refused plan must leave unchanged: module types, parameter objects,
    values, devices, dtypes and forward methods."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.dtype, p.device, p.requires_grad, p.detach().clone())
                   for n, p in model.named_parameters()],
        "forwards": [(n, m.__dict__.get("forward")) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in
                  model.named_modules()],
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["forwards"] == before["forwards"]
    assert after["hooks"] == before["hooks"]
    for a, b in zip(after["params"], before["params"]):
        assert a[:5] == b[:5]
        assert torch.equal(a[5], b[5])
