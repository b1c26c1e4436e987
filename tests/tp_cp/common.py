"""Models, batches and the single-process training loop shared by the tp/cp tests and
their torchrun worker (tests/tp_cp/tp_cp_worker.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from overdrive.models.llama import Attention, LlamaConfig, apply_rope, tiny
from overdrive.quiet import known_harmless_noise

LR = 0.1
STEPS = 5
SEQ = 16
BATCH = 2
VOCAB = 256


def batches(n: int = STEPS, vocab: int = VOCAB, seq: int = SEQ, seed: int = 1,
            ignored: int = 0) -> list[dict]:
    """Causal-LM batches: the labels are the inputs (the models' losses shift them), the
    first ``ignored`` labels of every sequence -100 (a prompt the loss skips)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (BATCH, seq), generator=g)
        labels = ids.clone()
        labels[:, :ignored] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def hf_batches(n: int = STEPS) -> list[dict]:
    return batches(n, vocab=128)


def llama(**cfg) -> nn.Module:
    return tiny(n_layers=2, **cfg)


def hf_llama() -> nn.Module:
    with known_harmless_noise():  # transformers imports torchao
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


class StoredHeadsAttention(Attention):
    """Attention that reshapes with stored head counts (needs Plan.tp_divide_attrs)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads

    def forward(self, x, rope):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


def stored_heads_llama() -> nn.Module:
    model = llama(n_kv_heads=2)
    for block in model.layers:
        new = StoredHeadsAttention(model.cfg)
        new.load_state_dict(block.attn.state_dict())
        block.attn = new
    return model


def train(model: nn.Module, data: list[dict], step_fn=None) -> list[float]:
    """Plain single-process SGD: the reference every parallel run must match."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def fp8_llama() -> nn.Module:
    """The tiny Llama with torchao tensorwise Float8Linear layers (what the fp8 pass makes)."""
    with known_harmless_noise():
        from torchao.float8 import convert_to_float8_training

    torch.manual_seed(0)
    return convert_to_float8_training(llama(ffn_dim=128),
                                      module_filter_fn=lambda mod, fqn: fqn != "lm_head")


class LinearOnlyBlock(nn.Module):
    """Bias-free Linears only: under fp8 an FSDP unit of it holds nothing but float8 weights."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.up = nn.Linear(dim, dim, bias=False)
        self.down = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return x + self.down(F.relu(self.up(x)))


class LinearOnlyNet(nn.Module):
    def __init__(self, dim: int = 64, n_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(LinearOnlyBlock(dim) for _ in range(n_layers))
        self.head = nn.Linear(dim, 16)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def linear_only_net() -> nn.Module:
    torch.manual_seed(0)
    return LinearOnlyNet()


def regression_batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 64, generator=g), torch.randn(4, 16, generator=g))
            for _ in range(n)]


def train_regression(model: nn.Module, data, backward=None, opt=None) -> list[float]:
    """SGD on the mean squared error; ``backward``/``opt`` default to plain torch's."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for x, y in data:
        loss = F.mse_loss(model(x), y)
        (backward or torch.Tensor.backward)(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
