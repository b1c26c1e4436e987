"""The paths only a CUDA machine takes: torch's ring-attention context parallelism, FSDP2
CPU offload, torchao's float8 TP styles and the nccl process group (with gloo beside it
for CPU tensors). Marked ``cuda``; skipped with a reason where CUDA is absent, and the
two-rank ones where fewer than two GPUs are (nccl allows one rank per GPU)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import overdrive as od
from tests.helpers import child_env, read_json, run_torchrun
from tests.tp_cp.common import LR, batches, fp8_llama, llama, train

WORKER = Path(__file__).with_name("tp_cp_worker.py")
CUDA = torch.device("cuda", 0)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA devices (nccl: one rank per GPU)")
fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 matmuls need CUDA compute capability >= 8.9")


def on_cuda(data: list[dict]) -> list[dict]:
    return [{k: v.to(CUDA) for k, v in b.items()} for b in data]


def cuda_reference(model) -> list[float]:
    return train(model.to(CUDA), on_cuda(batches()))


def test_nccl_group_keeps_gloo_for_cpu_tensors():
    from overdrive.runtime.state import ensure_process_group

    ensure_process_group(CUDA)  # a 1-rank group: "cpu:gloo,cuda:nccl"
    gpu, cpu = torch.ones(3, device=CUDA), torch.ones(3)
    dist.all_reduce(gpu)
    dist.all_reduce(cpu)  # would fail on a plain nccl group
    got = [None]
    dist.all_gather_object(got, {"rank": dist.get_rank()})
    assert got == [{"rank": 0}] and gpu.sum().item() == cpu.sum().item() == 3


def test_torch_ring_attention_matches_sdpa_on_one_gpu():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _disable_context_parallel_dispatcher,
        _enable_context_parallel_dispatcher,
    )

    from overdrive.passes.context_parallel import ContextParallelAttention
    from overdrive.runtime.state import ensure_process_group

    ensure_process_group(CUDA)
    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("cp",))
    _enable_context_parallel_dispatcher()  # what the pass's apply does on CUDA
    _cp_options.enable_load_balance = True
    try:
        g = torch.Generator(device=CUDA).manual_seed(0)
        q, k, v = (torch.randn(2, 4, 16, 8, device=CUDA, generator=g).requires_grad_()
                   for _ in range(3))
        with ContextParallelAttention(mesh, 1, use_torch_cp=True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(),
                                              is_causal=True)
        assert (out - want).abs().max().item() < 1e-5
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    finally:
        _disable_context_parallel_dispatcher()


def test_fsdp_cpu_offload_trains_on_one_gpu():
    torch.manual_seed(0)
    model = llama()
    want = cuda_reference(copy.deepcopy(model))
    rt = od.accelerate(model, od.Plan(fsdp=od.FSDP(offload=True)),
                       optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    assert rt.report["fsdp"].details["offload"]
    assert all(p.to_local().device.type == "cpu" for p in rt.model.parameters())
    got = []
    for batch in on_cuda(batches()):
        loss = rt.model(**batch).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        got.append(loss.item())
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)


@pytest.fixture(scope="module")
def two_gpu_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda2")
    out = tmp / "out.json"
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "0,1")  # child_env hides them by default
    run_torchrun(WORKER, 2, str(out), "cuda_cp", "cuda_fp8_tp", tmp_path=tmp,
                 env=child_env(CUDA_VISIBLE_DEVICES=gpus))
    return read_json(out)


@pytest.mark.dist
@two_gpus
def test_ring_context_parallel_matches_one_gpu(two_gpu_ranks):
    res = two_gpu_ranks["cuda_cp"]
    assert res["attention"] == "torch ring SDPA" and res["device"].startswith("cuda")
    torch.manual_seed(0)
    want = cuda_reference(llama())
    assert max(abs(a - b) for a, b in zip(res["losses"], want)) < 1e-4, (res["losses"], want)


@pytest.mark.dist
@two_gpus
@fp8_gpu
def test_float8_tp_styles_on_nccl(two_gpu_ranks):
    res = two_gpu_ranks["cuda_fp8_tp"]
    assert res["float8_modules"] == 14
    assert any("use torchao's float8 TP styles" in n for n in res["notes"]), res["notes"]
    torch.manual_seed(0)
    want = cuda_reference(fp8_llama())
    # float8 all-gathers round like the single GPU's casts; fp8 matmuls keep ~1e-2 apart
    assert max(abs(a - b) for a, b in zip(res["losses"], want)) < 2e-2, (res["losses"], want)
