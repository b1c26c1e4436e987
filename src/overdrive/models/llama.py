"""A small, readable Llama-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU).

The reference model of overdrive's examples, tests and benchmarks, in the torchtitan /
gpt-fast style: attention reshapes with ``-1`` heads and a stored ``head_dim`` so tensor
parallelism needs no change, ``init_weights`` re-initialises everything (meta-device
models are materialised with ``to_empty`` + ``init_weights``), and ``llama3_8b`` /
``llama3_70b`` give the real shapes for ``overdrive inspect`` on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return 16 * ((hidden + 15) // 16)


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                           / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # (seq, head_dim)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (b, s, h, d); table: (s, d) holding [cos | sin] of the d/2 frequencies."""
    half = x.shape[-1] // 2
    cos, sin = table[:, :half], table[:, half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


IGNORE_INDEX = -100


def shift_left(labels: torch.Tensor) -> torch.Tensor:
    """``labels[:, 1:]`` with ``IGNORE_INDEX`` appended: the target of every position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None,
                   shift_labels: torch.Tensor | None = None,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: the summed token losses over ``num_items_in_batch``
    (default: the number of targets that are not ``IGNORE_INDEX``)."""
    targets = shift_left(labels) if shift_labels is None else shift_labels
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.n_heads // cfg.kv_heads
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("rope", rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                shift_labels: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None) -> CausalLMOutput:
        """Logits, and with ``labels`` (or ``shift_labels``) the next-token loss.

        As transformers' causal LMs: ``labels`` are the input ids (-100 ignored), shifted
        here, so position ``t`` is scored against token ``t+1``. ``shift_labels`` are
        targets already shifted (context parallelism shifts before it splits the
        sequence); ``num_items_in_batch`` divides the summed token losses instead of this
        call's own target count (a rank's share of a larger batch).
        """
        s = input_ids.shape[1]
        rope = self.rope[:s] if position_ids is None else self.rope[position_ids[0]]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, rope)
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(logits, labels, shift_labels, num_items_in_batch)
        return CausalLMOutput(loss, logits)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter and buffer in place: materialises a model that
        was built on the meta device and moved with ``to_empty``."""
        gen = None
        if seed is not None:
            device = self.embed_tokens.weight.device
            if device.type != "meta":
                gen = torch.Generator(device=device).manual_seed(seed)
        std = 0.02
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                scale = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(
                    ("o_proj.weight", "down_proj.weight")) else std
                p.normal_(0.0, scale, generator=gen)
        self.rope.copy_(rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                    device=self.rope.device))


def tiny(n_layers: int = 4, **kw) -> Llama:
    """The small model the tests and examples train on CPU."""
    model = Llama(LlamaConfig(n_layers=n_layers, **kw))
    model.init_weights(seed=0)
    return model


def llama3_8b() -> Llama:
    return Llama(LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             ffn_dim=14336, max_seq_len=8192, rope_theta=500000.0))


def llama3_70b() -> Llama:
    return Llama(LlamaConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                             ffn_dim=28672, max_seq_len=8192, rope_theta=500000.0))
