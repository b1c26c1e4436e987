"""tests.helpers.assert_untouched catches every kind of change a refused plan must not make."""

import pytest
import torch
from torch import nn

from overdrive.models.llama import tiny
from tests.helpers import assert_untouched, snapshot


def _add_buffer(m):
    m.layers[0].register_buffer("scale", torch.ones(1))


def _change_buffer(m):
    next(b for b in m.buffers()).add_(1)


def _add_parameter(m):
    m.layers[1].extra = nn.Parameter(torch.zeros(1))


def _override_forward(m):
    m.layers[0].forward = m.layers[0].forward


def _compile_in_place(m):
    m.layers[0].compile(backend="eager")


def _set_attribute(m):
    m.layers[0]._overdrive_checkpointed = "full"


def _add_hook(m):
    m.norm.register_forward_pre_hook(lambda *a: None)


def _add_state_dict_hook(m):
    m.register_load_state_dict_post_hook(lambda *a: None)


def _change_weight(m):
    with torch.no_grad():
        m.lm_head.weight[0, 0] += 1


def _swap_class(m):
    m.lm_head.__class__ = type("Other", (nn.Linear,), {})


def _eval(m):
    m.eval()


@pytest.mark.parametrize("change", [_add_buffer, _change_buffer, _add_parameter,
                                    _override_forward, _compile_in_place, _set_attribute,
                                    _add_hook, _add_state_dict_hook, _change_weight,
                                    _swap_class, _eval])
def test_any_change_is_caught(change):
    model = tiny(n_layers=2)
    assert list(model.buffers()), "tiny() keeps its RoPE table as a buffer"
    before = snapshot(model)
    assert_untouched(model, before)
    change(model)
    with pytest.raises(AssertionError):
        assert_untouched(model, before)


def test_meta_models_compare_without_values():
    with torch.device("meta"):
        model = tiny(n_layers=1)
    before = snapshot(model)
    assert_untouched(model, before)
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(AssertionError):
        assert_untouched(model, before)


def test_require_skips_locally_and_fails_in_ci(tmp_path):
    """A missing test dependency is a skip on a developer's machine, a failure in CI."""
    import subprocess
    import sys

    from tests.helpers import ROOT, child_env

    test = tmp_path / "test_needs_missing.py"
    test.write_text("from tests.helpers import require\n"
                    "require('overdrive_no_such_module')\n\n"
                    "def test_never():\n    pass\n")

    def run(ci: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(test)], env=child_env(CI=ci), cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    local = run("")
    assert local.returncode in (0, 5) and "1 skipped" in local.stdout, local.stdout  # 5: none ran
    ci = run("true")
    assert ci.returncode != 0, ci.stdout
    assert "test dependency 'overdrive_no_such_module' cannot be imported" in ci.stdout
