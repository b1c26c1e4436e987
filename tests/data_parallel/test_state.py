"""runtime/state.py: which device, backend and current device a rank gets, with fake
accelerators monkeypatched in (this machine has none)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import overdrive as od
from overdrive.runtime import state


def fake_accelerator(count: int, calls: list | None = None) -> SimpleNamespace:
    return SimpleNamespace(is_available=lambda: True, device_count=lambda: count,
                           set_device=lambda d: calls.append(d))


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_pick_device_prefers_cuda_then_xpu_then_cpu(monkeypatch, no_cuda):
    monkeypatch.setattr(torch, "xpu", SimpleNamespace(is_available=lambda: False))
    assert state.pick_device(3) == torch.device("cpu")
    monkeypatch.setattr(torch, "xpu", fake_accelerator(2))
    assert state.pick_device(3) == torch.device("xpu", 1)  # local rank modulo the count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert state.pick_device(9) == torch.device("cuda", 1)


def test_npu_is_found_once_torch_npu_made_torch_npu(monkeypatch, no_cuda):
    monkeypatch.setattr(torch, "xpu", SimpleNamespace(is_available=lambda: False))
    monkeypatch.delattr(torch, "npu", raising=False)
    assert state.pick_device(0) == torch.device("cpu")
    made = []
    monkeypatch.setattr(torch, "npu", fake_accelerator(4), raising=False)
    monkeypatch.setattr(torch, "device", lambda kind, index=None: made.append((kind, index))
                        or SimpleNamespace(type=kind, index=index))
    assert state.pick_device(5).type == "npu" and made == [("npu", 1)]


@pytest.mark.parametrize("kind,backend,group", [
    ("cuda", "nccl", "cpu:gloo,cuda:nccl"),
    ("xpu", "xccl", "cpu:gloo,xpu:xccl"),
    ("npu", "hccl", "cpu:gloo,npu:hccl"),
    ("cpu", "gloo", "gloo"),
])
def test_backends_keep_gloo_for_cpu_tensors(kind, backend, group):
    device = SimpleNamespace(type=kind, index=0)
    assert state.backend_for(device) == backend
    assert state.process_group_backend(device) == group


def test_process_group_initialised_with_the_mixed_backend(monkeypatch):
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.append(kw))
    state.ensure_process_group(torch.device("xpu", 0))
    state.ensure_process_group(torch.device("cpu"))
    assert [kw["backend"] for kw in seen] == ["cpu:gloo,xpu:xccl", "gloo"]


def test_current_device_set_for_any_accelerator(monkeypatch):
    picked = []
    accel = SimpleNamespace(current_accelerator=lambda: torch.device("xpu"),
                            set_device_index=picked.append)
    monkeypatch.setattr(torch, "accelerator", accel)
    state.set_current_device(torch.device("xpu", 1))
    assert picked == [1]
    state.set_current_device(torch.device("cpu"))
    assert picked == [1]
    # an accelerator torch.accelerator does not report: its own module's set_device
    calls = []
    monkeypatch.setattr(torch, "accelerator", SimpleNamespace(current_accelerator=lambda: None))
    monkeypatch.setattr(torch, "npu", fake_accelerator(2, calls), raising=False)
    npu = SimpleNamespace(type="npu", index=1)
    state.set_current_device(npu)
    assert calls == [npu]


def test_make_env_sets_the_picked_device(monkeypatch):
    picked = []
    monkeypatch.setattr(state, "pick_device", lambda local_rank: torch.device("xpu", 0))
    monkeypatch.setattr(state, "set_current_device", picked.append)
    _, env = state.make_env(od.Plan())
    assert env.device == torch.device("xpu", 0) and picked == [torch.device("xpu", 0)]
