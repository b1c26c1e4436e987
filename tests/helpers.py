"""Shared test helpers: torchrun launches of small scripts, model fingerprints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def in_ci() -> bool:
    """CI sets ``CI=true`` (GitHub Actions, GitLab, most others)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str, reason: str = ""):
    """``pytest.importorskip`` for a test dependency, except in CI: there a missing or
    broken import fails (the suite would otherwise turn into silent skips)."""
    import pytest

    if not in_ci():
        return pytest.importorskip(module, reason=reason or None)
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken install is as missing as an absent one
        pytest.fail(f"CI: test dependency {module!r} cannot be imported ({type(err).__name__}: "
                    f"{err}); CI installs .[test,fp8,deepspeed]", pytrace=False)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's child process: this checkout importable, one thread,
    no inherited torchrun variables, and no GPUs unless ``extra`` names some — the
    multi-process tests run gloo on CPU, also on a GPU machine (every rank would
    otherwise pick cuda:0)."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
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
            f"--- each rank's last error lines ---\n{_error_lines(proc.stderr)}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


_ERROR_LINE = re.compile(r"Error|terminate called|what\(\)|Signal \d+|overdrive: rank")


def _error_lines(stderr: str, per_rank: int = 6) -> str:
    """The last few error-looking lines of each rank's stderr: a rank that aborted (gloo's
    C++ abort prints no traceback) is otherwise lost behind another rank's long one."""
    by_rank: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        if _ERROR_LINE.search(line):
            m = re.match(r"\[rank(\d+)\]", line)
            by_rank.setdefault(m.group(1) if m else "-", []).append(line[:300])
    return "\n".join(line for rank in sorted(by_rank) for line in by_rank[rank][-per_rank:])


def read_json(path: Path):
    return json.loads(Path(path).read_text())


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")


def _tensor_facts(name: str, t: torch.Tensor | None) -> tuple:
    if t is None:
        return (name, None)
    return (name, id(t), type(t), t.dtype, t.device, tuple(t.shape), t.requires_grad)


def _values(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.device.type == "meta":
        return None  # meta tensors have no values to compare
    return t.detach().clone()


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a refused plan must leave unchanged: the module tree (names, objects,
    classes), every module's attributes, instance-level forward and compiled call, its
    hooks, and every parameter and buffer (object, dtype, device, shape, values)."""
    modules = list(model.named_modules(remove_duplicate=False))
    params = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers(remove_duplicate=False))
    return {
        "modules": [(n, type(m), id(m), m.training) for n, m in modules],
        "attributes": [(n, sorted(m.__dict__)) for n, m in modules],
        "calls": [(n, m.__dict__.get("forward"), m.__dict__.get("_compiled_call_impl"))
                  for n, m in modules],
        "hooks": [(n, h, list(getattr(m, h).items())) for n, m in modules for h in HOOK_DICTS],
        "params": [_tensor_facts(n, p) for n, p in params],
        "buffers": [_tensor_facts(n, b) for n, b in buffers],
        "values": [(n, _values(t)) for n, t in params + buffers],
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("modules", "attributes", "calls", "hooks", "params", "buffers"):
        assert len(after[key]) == len(before[key]), f"{key}: {len(before[key])} → " \
                                                    f"{len(after[key])}"
        for a, b in zip(after[key], before[key]):
            assert a == b, f"{key} changed: {b} → {a}"
    assert [n for n, _ in after["values"]] == [n for n, _ in before["values"]]
    for (name, a), (_, b) in zip(after["values"], before["values"]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), \
            f"values of {name} changed"


def refusal_outcome(make, plan, optimizer) -> dict:
    """``od.accelerate(make(), plan)`` → ``{"error": message or None, "untouched": bool}``,
    for the multi-process refusal scenarios (run on every rank, reported as JSON)."""
    import overdrive as od

    model = make()
    before = snapshot(model)
    try:
        od.accelerate(model, plan, optimizer=optimizer)
    except od.PlanError as err:
        try:
            assert_untouched(model, before)
            untouched = True
        except AssertionError:
            untouched = False
        return {"error": str(err), "untouched": untouched}
    return {"error": None}


def pass_context(p, graph, plan, env):
    """The ``PassContext`` the manager would hand pass ``p`` under ``plan``."""
    from overdrive.rewrite.contract import PassContext

    cfg = next(c for c in plan.configs() if type(c) is p.config)
    return PassContext(cfg, graph, plan, env)


def check_pass(p, graph, plan, env):
    """``p.check`` as the manager calls it: the decision."""
    return p.check(pass_context(p, graph, plan, env))


def apply_pass(p, model, plan, env):
    """``check`` then ``apply`` of one pass on ``model``: the ``Applied`` (record and
    contributions), as the manager would gather it."""
    from overdrive.rewrite.graph import ModuleGraph
    from overdrive.rewrite.manager import _as_applied

    ctx = pass_context(p, ModuleGraph(model), plan, env)
    decision = p.check(ctx)
    return _as_applied(p, p.apply(model, decision, ctx), decision, ctx)
