"""Fine-tune a transformers LlamaForCausalLM under FSDP + tensor parallel, export it, and
reload the export with `from_pretrained`.

    overdrive launch --nproc 2 examples/finetune_transformers.py --plan fsdp+tp --out out/ft

The model comes from a tiny config (no downloads); its own tensor-parallel plan
(`config.base_model_tp_plan`) is used by `tp_plan="auto"`.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import overdrive as od


def build_model():
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", default="fsdp+tp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="out/finetune")
    args = parser.parse_args()

    model = build_model()
    rt = od.accelerate(model, args.plan, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    rt.print(rt.report)
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, 256, (args.steps * rt.dp_size * 2, 32), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)
    losses = []
    for step, (ids,) in enumerate(rt.shard(loader)):
        loss = rt.model(input_ids=ids, labels=ids).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        losses.append(rt.reduce(loss.detach(), "mean").item())
        rt.print(f"step {step}: loss {losses[-1]:.4f}")

    rt.export(args.out)
    rt.barrier()
    if rt.is_main:
        reloaded = LlamaForCausalLM.from_pretrained(args.out)
        full = rt.state_dict()
        for name, tensor in reloaded.state_dict().items():
            torch.testing.assert_close(tensor, full[name])
        print(f"exported to {args.out} and reloaded with from_pretrained: "
              f"{len(full)} tensors match")
    else:
        rt.state_dict()  # every rank takes part in gathering the shards


if __name__ == "__main__":
    main()
