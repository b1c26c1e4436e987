"""casting's forward kernels, and which one a device runs.

Two ways to compute ``x @ w.T`` from a stored float8 weight:

- ``copy``: upcast a temporary copy of the weight to the compute dtype, then a plain
  matmul. Every device, every layer kind; the output matches a bf16 model whose weights
  were rounded to float8 exactly. On CPU the copy is built in cache-sized chunks into one
  reusable buffer (``UpcastScratch``): a fresh multi-megabyte tensor per forward costs
  more in page faults than the conversion itself.
- ``scaled_mm``: ``torch._scaled_mm`` multiplies the float8 weight directly (1 byte read
  per weight, no copy). It needs float8 activations too, so each forward quantizes its
  input to float8_e4m3fn with one scale per row (per tensor where the device has no
  row-wise kernel): the outputs differ from ``copy`` by that rounding (~2-3% relative
  per layer). Plain ``nn.Linear`` layers with both feature counts divisible by 16 only.

torchao's float8 weight-only config (``Float8WeightOnlyConfig``) is not a third option:
its linear dequantizes the weight and runs the matmul in the high precision (a copy path).

``choose_kernel`` decides from a ``DeviceKind`` (what the device is and whether a
``_scaled_mm`` probe ran on it), so the rule is testable on any machine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackendUnavailable

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP16_MASK_E4M3 = -16512  # 0xBF80: sign, fp16 exponent bits 13..10 and 3 mantissa bits
E4M3_MAX = 448.0
KERNELS = ("auto", "copy", "scaled_mm")
FP8_TENSOR_CORES = (8, 9)  # Ada / Hopper and later


def upcast(weight: torch.Tensor, compute: torch.dtype) -> tuple[torch.Tensor, float]:
    """A temporary ``compute``-dtype copy of a stored weight, as ``(copy, scale)`` with
    ``weight == copy * scale`` exactly.

    torch's float8 -> bf16 conversion runs element by element on CPU (~4 ns/element
    here); moving the bits into float16 takes three vectorised int16 ops and one fast
    fp16 conversion (~3x faster). float8_e5m2 *is* float16's top byte. float8_e4m3fn's
    exponent/mantissa bits placed in float16's low exponent bits read exactly 2^-8 of the
    value, subnormals included (both formats' subnormal grids line up), so the caller
    multiplies by ``scale`` = 256 somewhere exact (a power of two).
    """
    if weight.dtype == torch.float8_e5m2:
        bits = weight.view(torch.int8).to(torch.int16).bitwise_left_shift_(8)
        return bits.view(torch.float16).to(compute), 1.0
    if weight.dtype == torch.float8_e4m3fn:
        bits = weight.view(torch.int8).to(torch.int16)
        bits.bitwise_left_shift_(7).bitwise_and_(FP16_MASK_E4M3)
        return bits.view(torch.float16).to(compute), 256.0
    return weight.to(compute), 1.0


# float8 bits -> bfloat16 bits: (shift, mask, exponent offset). The sign-extended int8
# shifted left puts the sign in bit 15 and exponent/mantissa right below bfloat16's
# exponent field's top; the mask clears the copies of the sign. The result reads 2^-offset
# of the value (bfloat16's bias 127 against the format's), its subnormals as bfloat16
# subnormals: one exact multiply by 2^offset (fp32 math) makes the copy. Finite values
# only (e5m2's inf would read as a number): casting never stores a non-finite weight.
TO_BF16_BITS = {torch.float8_e4m3fn: (4, -30736, 120),  # mask 0x87F0
                torch.float8_e5m2: (5, -28704, 112)}   # mask 0x8FE0
def denormals_kept() -> bool:
    """False under ``torch.set_flush_denormal(True)`` (the bf16 bit route needs them)."""
    return bool((torch.full((), 2.0 ** -140) * 2.0).item() != 0.0)


class UpcastScratch:
    """Reusable buffers for the CPU copy path, shared by the cast layers of one model
    (they run one after another): an int16 buffer as large as the largest weight, in which
    the bfloat16 copy is built in place, and (other compute dtypes) two chunk buffers.

    A fresh multi-megabyte tensor per forward costs page faults, and torch's float8 /
    float16 -> bfloat16 conversions are not vectorised on CPU; here a bfloat16 copy is
    four vectorised passes over one buffer (int8 -> int16, shift, mask, one exact
    multiply). Used only where nothing can keep the buffer: CPU, no autograd graph through
    the input, not under torch.compile. Buffers are per thread; never pickled or copied.
    """

    CHUNK = 1 << 17  # elements: 256 KiB of int16 + 512 KiB of fp32

    def __init__(self) -> None:
        # {thread: [int16 buffer, int16 chunk, fp32 chunk]}, {(thread, dtype): [output]}
        self._by_thread: dict = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._by_thread = {}

    def __deepcopy__(self, memo: dict) -> "UpcastScratch":
        new = memo[id(self)] = UpcastScratch()
        return new

    @staticmethod
    def applies(weight: torch.Tensor, x: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype in FLOAT8
                and not (torch.is_grad_enabled() and x.requires_grad)
                and not torch.compiler.is_compiling())

    def _buffers(self, numel: int) -> list[torch.Tensor]:
        key = threading.get_ident()
        bufs = self._by_thread.get(key)
        if bufs is None or bufs[0].numel() < numel:
            bufs = [torch.empty(numel, dtype=torch.int16),
                    torch.empty(self.CHUNK, dtype=torch.int16),
                    torch.empty(self.CHUNK, dtype=torch.float32)]
            self._by_thread[key] = bufs
        return bufs

    def upcast(self, weight: torch.Tensor, compute: torch.dtype) -> tuple[torch.Tensor, float]:
        """As ``upcast``, into the shared buffer (valid until the next cast layer runs)."""
        out, bits, wide = self._buffers(weight.numel())
        src = weight.view(torch.int8).reshape(-1)
        dst = out[:src.numel()]
        if compute == torch.bfloat16 and denormals_kept():
            shift, mask, offset = TO_BF16_BITS[weight.dtype]
            dst.copy_(src)
            dst.bitwise_left_shift_(shift).bitwise_and_(mask)
            return dst.view(torch.bfloat16).mul_(2.0 ** offset).view(weight.shape), 1.0
        e4m3 = weight.dtype == torch.float8_e4m3fn
        if compute not in (torch.float16, torch.float32, torch.bfloat16):
            raise ValueError(f"no upcast to {compute}")
        target = dst.view(torch.float16) if compute == torch.float16 else \
            self._wide_out(src.numel(), compute)
        for start in range(0, src.numel(), self.CHUNK):
            stop = min(src.numel(), start + self.CHUNK)
            b = bits[:stop - start]
            b.copy_(src[start:stop])
            if e4m3:
                b.bitwise_left_shift_(7).bitwise_and_(FP16_MASK_E4M3)
            else:
                b.bitwise_left_shift_(8)
            if compute == torch.float16:
                target[start:stop].view(torch.int16).copy_(b)
            elif compute == torch.float32:
                target[start:stop].copy_(b.view(torch.float16))
            else:
                w = wide[:stop - start]
                w.copy_(b.view(torch.float16))
                target[start:stop].copy_(w)
        return target.view(weight.shape), 256.0 if e4m3 else 1.0

    def _wide_out(self, numel: int, compute: torch.dtype) -> torch.Tensor:
        """The output buffer of the chunked route for a compute dtype other than fp16."""
        key = (threading.get_ident(), compute)
        buf = self._by_thread.get(key)
        if buf is None or buf[0].numel() < numel:
            buf = [torch.empty(numel, dtype=compute)]
            self._by_thread[key] = buf
        return buf[0][:numel]


# --------------------------------------------------------------------------- scaled_mm


def quantize_rows(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) as float8_e4m3fn and its fp32 dequantization scale: one per row
    (``(rows, 1)``) or one for the tensor."""
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = (amax.float() / E4M3_MAX).clamp(min=1e-12)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(-1, 1) if rowwise else scale.reshape(())


def scaled_mm(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
              rowwise: bool) -> torch.Tensor:
    """``x @ weight.T`` with ``torch._scaled_mm``: ``weight`` (out, in) float8_e4m3fn,
    stored unscaled; ``x`` 2-D in the compute dtype."""
    q, scale_a = quantize_rows(x, rowwise)
    n = weight.shape[0]
    scale_b = (torch.ones(1, n, device=x.device) if rowwise
               else torch.ones((), device=x.device))
    return torch._scaled_mm(q, weight.t(), scale_a=scale_a, scale_b=scale_b,
                            out_dtype=out_dtype)


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class DeviceKind:
    """What decides the kernel: the device type, its name, a GPU's compute capability,
    and the error of a ``_scaled_mm`` probe per scaling (None: it ran)."""

    type: str
    name: str
    capability: tuple[int, int] | None = None
    rowwise_error: str | None = "not probed"
    tensorwise_error: str | None = "not probed"

    @property
    def scaled_mm_runs(self) -> bool:
        return self.rowwise_error is None or self.tensorwise_error is None


@dataclass(frozen=True)
class KernelChoice:
    kernel: str          # "copy" or "scaled_mm"
    rowwise: bool        # scaled_mm: one activation scale per row (else per tensor)
    machine: str         # the device kind, in words (recorded beside the choice)
    reason: str


def _probe(device: torch.device, compute: torch.dtype, rowwise: bool) -> str | None:
    try:
        x = torch.randn(16, 32, device=device).to(compute)
        w = torch.randn(16, 32, device=device).to(torch.float8_e4m3fn)
        out = scaled_mm(x, w, compute, rowwise)
        if out.shape != (16, 16) or not torch.isfinite(out.float()).all():
            return "wrong result"
    except Exception as err:  # noqa: BLE001 - any failure: the device cannot take this path
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return None


def cpu_name() -> str:
    """'cpu AVX512 (avx512_bf16)': torch's vector capability and the bf16 matmul units."""
    units = [flag for flag, probe in (("avx512_bf16", "_is_avx512_bf16_supported"),
                                      ("amx", "_is_amx_tile_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    cap = torch.backends.cpu.get_cpu_capability()
    return f"cpu {cap}" + (f" ({', '.join(units)})" if units else "")


def device_kind(device: torch.device, compute: torch.dtype) -> DeviceKind:
    """Describe ``device`` and probe ``torch._scaled_mm`` on it (two tiny matmuls). A
    device this process cannot reach (od.inspect for another machine) is not probed."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return DeviceKind("cuda", "cuda (not present here)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(index)
        name = f"cuda sm_{cap[0]}{cap[1]} ({torch.cuda.get_device_name(index)})"
        if cap < FP8_TENSOR_CORES:
            return DeviceKind("cuda", name, cap)
        return DeviceKind("cuda", name, cap, _probe(device, compute, True),
                          _probe(device, compute, False))
    if device.type == "meta":
        return DeviceKind("meta", "meta")
    name = cpu_name() if device.type == "cpu" else device.type
    return DeviceKind(device.type, name, None, _probe(device, compute, True),
                      _probe(device, compute, False))


def choose_kernel(requested: str, storage: torch.dtype, compute: torch.dtype,
                  kind: DeviceKind) -> KernelChoice:
    """The kernel casting runs on ``kind``: ``requested`` is ``Casting.kernel``. "auto"
    takes ``scaled_mm`` only where fp8 matmul units make it the faster path (GPUs of
    compute capability >= 8.9 on which the probe ran); "scaled_mm" is refused where the
    probe failed or the storage is not float8_e4m3fn."""
    rowwise = kind.rowwise_error is None

    def fused(reason: str) -> KernelChoice:
        scaling = "one scale per row" if rowwise else "one scale per tensor"
        return KernelChoice("scaled_mm", rowwise, kind.name,
                            f"{reason}; activations quantized to float8_e4m3fn ({scaling})")

    if requested == "copy":
        return KernelChoice("copy", False, kind.name, "casting.kernel='copy'")
    unusable = None
    if storage != torch.float8_e4m3fn:
        unusable = f"the fused path takes float8_e4m3fn weights, not {storage}"
    elif compute not in (torch.bfloat16, torch.float16):
        unusable = f"the fused path computes in bfloat16 or float16, not {compute}"
    elif kind.type == "cuda" and kind.capability is not None \
            and kind.capability < FP8_TENSOR_CORES:
        unusable = (f"{kind.name} has no fp8 tensor cores (compute capability "
                    f"{kind.capability[0]}.{kind.capability[1]} < 8.9)")
    elif not kind.scaled_mm_runs:
        unusable = f"torch._scaled_mm does not run on {kind.name} ({kind.tensorwise_error})"
    if requested == "scaled_mm":
        if unusable:
            raise BackendUnavailable(
                f"casting.kernel='scaled_mm' is not available: {unusable}; use "
                "casting.kernel='auto' or 'copy' (the upcast copy runs everywhere)")
        return fused("casting.kernel='scaled_mm'")
    if unusable:
        return KernelChoice("copy", False, kind.name, unusable)
    if kind.type == "cuda":
        return fused(f"{kind.name} has fp8 tensor cores: torch._scaled_mm reads 1 byte a "
                     "weight")
    return KernelChoice("copy", False, kind.name,
                        f"torch._scaled_mm runs on {kind.name}, but without fp8 matmul units "
                        "it is slower than the upcast copy (benchmarks/casting.py: ~4x the "
                        "copy's forward at 16 tokens on an AVX-512 BF16 EPYC); "
                        "casting.kernel='scaled_mm' forces it")


def fused_misfit(module: nn.Module) -> str | None:
    """Why this layer cannot take the fused path (None: it can)."""
    if type(module) is not nn.Linear:
        return f"{type(module).__name__}: the fused path takes plain nn.Linear layers"
    if module.in_features % 16 or module.out_features % 16:
        return (f"in/out features {module.in_features}/{module.out_features}: "
                "torch._scaled_mm needs multiples of 16")
    return None
