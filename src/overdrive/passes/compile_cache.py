"""Warm starts for the compile pass: torch's compile cache artifacts in a cache dir.

``torch.compiler.save_cache_artifacts()`` serializes what this process's compiles put in
torch's caches (inductor's FX graphs, AOTAutograd entries, autotuning, PGO);
``load_cache_artifacts`` puts them back, so the next compile of the same graphs is a cache
hit. On CPU those artifacts hold inductor's generated C++ source but not the libraries g++
built from it, and g++ is most of a cold CPU compile: the bundle also carries those
libraries (``<key>*.so`` / ``.o`` in inductor's cache dir, named by the hash of their
source and compile command, so a machine whose compiler flags differ never picks them up).

One bundle is a zip file ``<fingerprint>.zip`` in the cache dir: ``torch.bin`` (the
artifacts), ``kernels/<path under inductor's cache dir>`` and ``meta.json``. The
fingerprint hashes the plan, the model's structure (module names and classes, the files
that define those classes, parameter and buffer shapes and dtypes), torch's version, the
device kind and the rank's pp / cp / tp place. Loading or writing a bundle never fails a run: a broken one is a warning and a miss.
Loading a bundle executes its code (as torch's own caches do): keep the cache dir private.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = 1
KERNEL_SUFFIXES = (".so", ".o")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/overdrive/compile``, else ``~/.cache/overdrive/compile``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "overdrive" / "compile"


# --------------------------------------------------------------------------- fingerprint


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable(obj: Any) -> str:
    """A repr without memory addresses (callables in a plan: filters, backends)."""
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    return _ADDRESS.sub("", repr(obj))


def _class_file_hash(cls: type, seen: dict[str, str]) -> str:
    """A hash of the file that defines ``cls`` (an edit there changes the key: a miss and a
    fresh bundle, never a stale one); its qualified name where there is no file."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if not path:
        return f"{cls.__module__}.{cls.__qualname__}"
    if path not in seen:
        try:
            seen[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        except OSError:
            seen[path] = path
    return seen[path]


def _model_structure(model: nn.Module) -> list[Any]:
    rows: list[Any] = []
    classes: dict[str, str] = {}
    files: dict[str, str] = {}
    for name, module in model.named_modules():
        cls = type(module)
        qual = f"{cls.__module__}.{cls.__qualname__}"
        if qual not in classes:
            classes[qual] = _class_file_hash(cls, files)
        rows.append(("module", name, qual))
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            rows.append((kind, name, tuple(t.shape), str(t.dtype), t.requires_grad))
    rows.append(("sources", sorted(classes.items())))
    return rows


def device_kind(device: torch.device) -> str:
    """``cpu``, ``cuda:<name>``…; od.inspect's meta device stands for the device a real
    run would pick (cuda, else xpu / npu, else cpu), so both name the same bundle."""
    if device.type == "meta":
        for kind in ("cuda", "xpu", "npu"):
            backend = getattr(torch, kind, None)
            if backend is not None and backend.is_available():
                device = torch.device(kind, 0)
                break
        else:
            device = torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else 0
        return f"cuda:{torch.cuda.get_device_name(index)}"
    return device.type


def fingerprint(plan: Any, model: nn.Module, device: torch.device, world_size: int,
                place: dict[str, int] | None = None) -> str:
    """The key of a bundle: equal for the same plan, model structure, torch and device.
    ``place``: this rank's pp / cp / tp coordinates (ranks there compile different graphs;
    data-parallel peers compile the same ones and share a bundle)."""
    parts = {
        "place": sorted((place or {}).items()),
        "format": FORMAT,
        "plan": {f.name: _stable(getattr(plan, f.name)) for f in dataclasses.fields(plan)},
        "model": _model_structure(model),
        "torch": torch.__version__,
        "python": sys.version_info[:2],
        "device": device_kind(device),
        "world_size": world_size,
    }
    blob = json.dumps(parts, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# --------------------------------------------------------------------------- the bundle


def _inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def _compiled_kernel_keys() -> set[str]:
    """The hashes of the C++ libraries this process compiled or loaded (inductor CPU)."""
    from torch._inductor import codecache

    keys: set[str] = set()
    for cls in (codecache.CppCodeCache, codecache.CppPythonBindingsCodeCache,
                codecache.CppWrapperCodeCache):
        keys.update(cls.cache)
    return keys


def _kernel_files(since: float) -> dict[str, bytes]:
    """The C++ libraries of this process's compiles: those its code caches hold, and any
    built since ``since`` (inductor's CPU ISA probes are compiled there too, per process)."""
    keys = _compiled_kernel_keys()
    root = _inductor_cache_dir()
    out: dict[str, bytes] = {}
    for suffix in KERNEL_SUFFIXES:
        for path in root.glob(f"??/*{suffix}"):
            try:
                fresh = path.stat().st_mtime >= since
            except OSError:
                continue
            if fresh or path.name.split(".", 1)[0] in keys:
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


@dataclass
class LoadResult:
    hit: bool
    seconds: float = 0.0
    kernels: int = 0
    artifacts: dict[str, int] = dataclasses.field(default_factory=dict)
    problem: str | None = None  # why a present bundle was not used


def load_bundle(path: Path) -> LoadResult:
    """Put a bundle's artifacts into torch's caches and its kernels into inductor's dir."""
    if not path.is_file():
        return LoadResult(hit=False)
    t0 = time.perf_counter()
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("meta.json"))
            if meta.get("torch") != torch.__version__ or meta.get("format") != FORMAT:
                return LoadResult(hit=False, problem=f"{path} was written by torch "
                                  f"{meta.get('torch')} (this is {torch.__version__})")
            root = _inductor_cache_dir()
            kernels = 0
            for name in zf.namelist():
                if not name.startswith("kernels/"):
                    continue
                rel = Path(name[len("kernels/"):])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"unsafe member {name!r}")
                dest = root / rel
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _write_atomic(dest, zf.read(name))
                kernels += 1
            info = torch.compiler.load_cache_artifacts(zf.read("torch.bin"))
    except Exception as err:  # noqa: BLE001 - a broken cache is a miss, never a failure
        return LoadResult(hit=False, problem=f"{path} could not be read ({err!r})")
    counts = {kind: len(keys) for kind, keys in (info.artifacts.items() if info else ())}
    return LoadResult(hit=True, seconds=time.perf_counter() - t0, kernels=kernels,
                      artifacts=counts)


def save_bundle(path: Path, key: str, since: float) -> tuple[int, str | None]:
    """Write what this process compiled to ``path`` atomically: (bytes written, problem).
    Nothing is written when torch recorded no artifacts (the eager backend). ``since``:
    when the compiles began (``time.time()``): kernel libraries built after it go in."""
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return 0, None
        blob, info = saved
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.writestr("meta.json", json.dumps({
                "format": FORMAT, "fingerprint": key, "torch": torch.__version__,
                "artifacts": {k: len(v) for k, v in info.artifacts.items()}}))
            zf.writestr("torch.bin", blob)
            for rel, data in sorted(_kernel_files(since).items()):
                zf.writestr(f"kernels/{rel}", data)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = buf.getvalue()
        _write_atomic(path, data)
        return len(data), None
    except Exception as err:  # noqa: BLE001 - a cache that cannot be written is a warning
        return 0, f"could not write the compile cache {path} ({err!r})"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["default_cache_dir", "fingerprint", "device_kind", "load_bundle", "save_bundle",
           "LoadResult"]
