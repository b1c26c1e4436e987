"""The model, batches and single-process reference shared by the data-parallel tests
and their torchrun worker (both sides must build exactly the same things)."""

from __future__ import annotations

import torch

from overdrive.models.llama import Llama, LlamaConfig
from overdrive.quiet import known_harmless_noise

STEPS = 5
LR = 0.5
GLOBAL_BATCH = 8  # divisible by 4 data ranks × 2 micro-steps
SEQ = 16
VOCAB = 128


def llama_config() -> dict:
    return dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_seq_len=SEQ)


def make_llama() -> Llama:
    model = Llama(LlamaConfig(**llama_config()))
    model.init_weights(seed=0)
    return model


def make_hf():
    with known_harmless_noise():  # transformers imports torchao
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=SEQ, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def global_batches() -> list[torch.Tensor]:
    """Counting sequences from random starts: learnable for a next-token loss (the
    reference Llama and transformers' both shift the labels)."""
    g = torch.Generator().manual_seed(1234)
    starts = [torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g) for _ in range(STEPS)]
    return [(s + torch.arange(SEQ)) % VOCAB for s in starts]


def reference_losses(model: torch.nn.Module) -> list[float]:
    """Plain single-process SGD on the full global batches."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in global_batches():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
