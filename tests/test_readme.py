"""Every code block marked `<!-- runnable -->` in README.md and docs/*.md runs as written."""

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env

BLOCK = re.compile(r"<!-- runnable -->\s*```python\n(.*?)```", re.S)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = {f"{doc.stem}-{i}": code for doc in DOCS
          for i, code in enumerate(BLOCK.findall(doc.read_text()))}


def test_readme_has_runnable_blocks():
    assert sum(k.startswith("README-") for k in BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS.values(), ids=BLOCKS.keys())
def test_readme_block_runs(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], env=child_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_readme_pipeline_line_is_the_builtin_order():
    from overdrive.rewrite.manager import _REGISTRY, registered_passes

    line = next(l for l in (ROOT / "README.md").read_text().splitlines()
                if l.startswith("pipeline → "))
    names = [n.strip() for stage in line.split("→") for n in stage.split("|")]
    builtin = [n for n in registered_passes()
               if _REGISTRY[n].cls.__module__.startswith("overdrive.passes.")]
    assert names == builtin


def test_docs_point_at_nothing_outside_the_repository():
    """A clone has only the repository: README/docs links and paths resolve inside it."""
    link = re.compile(r"\]\(([^)#\s]+)[^)]*\)|`(\.\./[^`\s]+)`")
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text, doc.name
        for target in (a or b for a, b in link.findall(text)):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(ROOT.resolve()), f"{doc.name}: {target}"
