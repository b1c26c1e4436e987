"""torchrun script: train a tiny transformers LlamaForCausalLM under PLAN for 2 steps,
rt.save it to OUT/ck and write the training run's logits on fixed tokens to
OUT/logits.pt (rank 0). test_offline_export.py exports the checkpoint in a fresh process."""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import overdrive as od

out, plan = Path(sys.argv[1]), sys.argv[2]
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  tie_word_embeddings=True)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
g = torch.Generator().manual_seed(rt.dp_rank)
for _ in range(2):
    ids = torch.randint(0, 64, (2, 16), generator=g)
    rt.backward(rt.model(input_ids=ids, labels=ids).loss)
    rt.optimizer.step()
    rt.optimizer.zero_grad()
rt.save(out / "ck")
probe = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(99))
with torch.no_grad():
    logits = rt.model(input_ids=probe).logits
if rt.is_main:
    torch.save({"probe": probe, "logits": logits}, out / "logits.pt")
