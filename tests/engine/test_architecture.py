"""The arrows of the design, read from the source: the engine (``rewrite/``) knows no pass
and imports neither ``passes/`` nor ``runtime/``; no pass imports another pass or the
runtime; no string-keyed hand-offs; no test hooks or environment writes in the library."""

import ast
import re
from pathlib import Path

import overdrive
import overdrive.passes  # noqa: F401  (registers the built-in passes: `import overdrive` is lazy)
from overdrive.rewrite.manager import _REGISTRY

SRC = Path(overdrive.__file__).parent
BUILTIN = sorted(n for n, e in _REGISTRY.items()
                 if e.cls.__module__.startswith("overdrive.passes."))


def _sources(folder: str) -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in sorted((SRC / folder).glob("*.py"))}


def _imports(source: str, module: str) -> set[str]:
    """Absolute names of what ``source`` (the module named ``module``) imports."""
    out = set()
    package = module.rpartition(".")[0].split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_the_builtin_passes_are_the_twelve_we_know():
    assert set(BUILTIN) == {"casting", "fp8", "tensor_parallel", "context_parallel",
                            "checkpointing", "compile", "mixed_precision", "fsdp", "ddp",
                            "deepspeed", "pipeline", "offload"}


def test_rewrite_imports_neither_passes_nor_runtime():
    for name, source in _sources("rewrite").items():
        bad = {m for m in _imports(source, "overdrive." + name[:-3].replace("/", "."))
               if m.startswith(("overdrive.passes", "overdrive.runtime", "overdrive.plan_spec",
                                "overdrive.planner", "overdrive.api"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_rewrite_names_no_builtin_pass():
    """Not in code, strings, comments or docstrings (torch's own ``.compile()`` aside)."""
    words = re.compile(r"(?<![.\w])(" + "|".join(BUILTIN) + r")(?!\w|\()", re.I)
    for name, source in _sources("rewrite").items():
        hits = [(i, line.strip()) for i, line in enumerate(source.splitlines(), 1)
                if words.search(line)]
        assert not hits, f"{name} names a built-in pass: {hits}"


def test_no_pass_imports_another_pass_or_the_runtime():
    """A pass module may use a helper module of its own (ddp_comm.py registers nothing)."""
    pass_modules = {e.cls.__module__ for e in _REGISTRY.values()
                    if e.cls.__module__.startswith("overdrive.passes.")}
    for name, source in _sources("passes").items():
        if name.endswith("__init__.py"):
            continue  # it imports every pass: that is how they register
        own = "overdrive.passes." + Path(name).stem
        imported = _imports(source, own)
        bad = {m for m in imported if m.startswith("overdrive.runtime")}
        bad |= {m for m in pass_modules - {own} if m in imported}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_what_the_passes_share_imports_no_pass_and_no_runtime():
    """The neutral modules beside the packages (stages.py, bubble.py, safetensors_io.py,
    sizes.py, plan_spec.py…) that passes import: through them no pass reaches runtime/ or
    another pass either."""
    top = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    shared = set()
    for name, source in _sources("passes").items():
        shared |= {m.split(".")[1] for m in _imports(source, "overdrive.passes." + name[:-3])
                   if m.startswith("overdrive.") and m.split(".")[1] in top}
    assert {"stages", "safetensors_io", "sizes", "plan_spec"} <= shared
    todo, seen = list(shared), set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        imported = _imports((SRC / f"{mod}.py").read_text(), f"overdrive.{mod}")
        bad = {m for m in imported
               if m.startswith(("overdrive.passes", "overdrive.runtime", "overdrive.api"))}
        assert not bad, f"{mod}.py (imported by a pass) imports {sorted(bad)}"
        todo += [m.split(".")[1] for m in imported
                 if m.startswith("overdrive.") and m.split(".")[1] in top]


def test_no_string_keyed_handoffs_test_hooks_or_environment_writes():
    everything = {str(p.relative_to(SRC)): p.read_text() for p in SRC.rglob("*.py")}
    for name, source in everything.items():
        assert "extras[" not in source, name
        assert "TEST_HANG" not in source and "test_hook" not in source, name
        assert "sys.excepthook =" not in source, name  # no process-wide exception hook
        # (od.launch's own child processes may os._exit; so may the desync watchdog of
        # runtime/ledger.py, once DesyncError could not be raised in a main thread stuck in
        # a C++ collective, or when the launcher is gone: docs/reliability.md)
        if name.startswith("runtime/") and name != "runtime/ledger.py":
            assert "os._exit" not in source, name
        # state.py: a one-rank group's rendezvous; spawn.py: od.launch's spawned worker
        # sets its own RANK/WORLD_SIZE before anything runs in it (a launcher, as torchrun)
        if name not in ("runtime/state.py", "spawn.py"):
            writes = re.findall(r"os\.environ(\[[^\]]+\]\s*=|\.setdefault|\.update|\.pop)", source)
            assert not writes, f"{name} writes os.environ"


def test_runtime_and_export_import_no_circle():
    runtime = _imports((SRC / "runtime/runtime.py").read_text(), "overdrive.runtime.runtime")
    export = _imports((SRC / "runtime/export.py").read_text(), "overdrive.runtime.export")
    assert not any(m.startswith("overdrive.runtime.runtime") for m in export)
    assert "overdrive.runtime.keys.clean_key" in runtime | export  # the leaf both use


def test_importing_the_trace_leaves_torch_flop_formulas_alone():
    import torch
    from torch.utils import flop_counter

    import overdrive.rewrite.trace  # noqa: F401

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert op not in flop_counter.flop_registry


def test_the_runtime_docstring_lists_its_whole_public_surface():
    from overdrive.runtime.runtime import Runtime

    tree = ast.parse((SRC / "runtime/runtime.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runtime")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    public = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)
              and not n.name.startswith("_")}
    public |= {a.attr for a in ast.walk(init) if isinstance(a, ast.Attribute)
               and isinstance(a.value, ast.Name) and a.value.id == "self"
               and not a.attr.startswith("_")}
    for group in ("loop", "data", "collectives", "checkpoint", "info"):
        assert f"\n    {group}\n" in Runtime.__doc__
    missing = sorted(m for m in public if f"``{m}" not in Runtime.__doc__)
    assert not missing, f"public Runtime members not in its docstring: {missing}"
    # and the other way: every name the groups list is a real member
    members = public | {a.attr for a in ast.walk(init) if isinstance(a, ast.Attribute)
                        and isinstance(a.value, ast.Name) and a.value.id == "self"}
    listed = set(re.findall(r"``(\w+)", Runtime.__doc__.split("\n    loop\n", 1)[1]))
    not_members = sorted(n for n in listed - {"hook", "_"}  # a signature's argument; "_"
                         if n not in members and not hasattr(Runtime, n))
    assert not not_members, f"the Runtime docstring lists non-members: {not_members}"
