"""The overdrive command: inspect and env."""

import json
import subprocess
import sys

from tests.helpers import ROOT, child_env


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "overdrive", *args], capture_output=True,
                          text=True, env=child_env(), cwd=ROOT, timeout=120)


def test_env_reports_versions_and_backends():
    out = run_cli("env", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"].startswith("2.") and info["cuda_available"] in (True, False)
    assert "torchao" in info and "deepspeed" in info and "transformer_engine" in info
    assert info["distributed_backends"]["gloo"] is True


def test_inspect_prints_the_report():
    out = run_cli("inspect", "overdrive.models.llama:llama3_8b", "--world-size", "1")
    assert out.returncode == 0, out.stderr
    assert "dry run" in out.stdout and "32 under 'layers'" in out.stdout
    assert "memory per rank (world size 1)" in out.stdout


def test_inspect_llama3_8b_fsdp_compile_on_eight_ranks():
    out = run_cli("inspect", "overdrive.models.llama:llama3_8b", "--plan", "fsdp+compile",
                  "--world-size", "8")
    assert out.returncode == 0, out.stderr
    assert "32 under 'layers'" in out.stdout and "memory per rank (world size 8)" in out.stdout
    assert "compile" in out.stdout and "fsdp" in out.stdout
    # 8.03e9 parameters, fp32, sharded 8 ways: 3.74 GiB per rank
    assert "parameters      3.74 GiB   (full model 29.92 GiB)" in out.stdout


def test_inspect_usage_example_names_a_real_factory():
    out = run_cli("inspect", "llama3_8b")
    assert out.returncode != 0 and "overdrive.models.llama:llama3_8b" in out.stderr


def test_inspect_plan_error_is_a_clean_message():
    out = run_cli("inspect", "overdrive.models.llama:tiny", "--plan", "fsdp+warp")
    assert out.returncode == 2
    assert "PlanError" in out.stderr and "unknown preset token 'warp'" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_does_not_import_torch():
    """`overdrive --help` (and `import overdrive`) stay light: torch is imported on first
    use of a name that needs it, not by the package or the command line."""
    code = ("import sys\n"
            "import overdrive\n"
            "from overdrive.cli import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: overdrive" in proc.stdout
    assert "torch imported: False" in proc.stdout


def test_lazy_names_resolve_and_builtins_register_first():
    code = ("import dataclasses\n"
            "import overdrive as od\n"
            "@dataclasses.dataclass(frozen=True)\n"
            "class MineConfig:\n"
            "    pass\n"
            "@od.register_pass('mine', config=MineConfig)\n"
            "class Mine(od.Pass):\n"
            "    pass\n"
            "from overdrive.rewrite.manager import registered_passes\n"
            "names = registered_passes()\n"
            "print('casting' in names[:-1], names[-1], od.PlanError.__name__,\n"
            "      'accelerate' in dir(od))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "mine", "PlanError", "True"]


def test_public_names_stay_themselves_after_every_submodule_is_imported():
    """A submodule named like a public name (``overdrive/launch.py`` for ``od.launch``)
    would replace the lazy name with the module once anything imports it."""
    code = ("import importlib, pkgutil, types\n"
            "import overdrive as od\n"
            "for m in pkgutil.walk_packages(od.__path__, 'overdrive.'):\n"
            "    if m.name != 'overdrive.__main__':\n"
            "        importlib.import_module(m.name)\n"
            "bad = [n for n in od.__all__ if isinstance(getattr(od, n), types.ModuleType)]\n"
            "print('modules:', bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "modules: []" in proc.stdout
