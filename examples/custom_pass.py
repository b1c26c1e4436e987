"""A user-registered pass placed between the built-ins, shown in the report.

    python examples/custom_pass.py

`freeze_embeddings` runs after activation checkpointing and before compile: it freezes the
token embeddings (a common fine-tuning trick) and says so in the pass record.
"""

import torch
from torch import nn

import overdrive as od
from overdrive.models.llama import tiny


@od.register_pass("freeze_embeddings", after=("checkpointing",), before=("compile",))
class FreezeEmbeddings(od.Pass):
    def enabled(self, plan):
        return True  # a registered pass runs in every plan unless it says otherwise

    def check(self, graph, plan, env):
        if not graph.modules_of_type(nn.Embedding):
            raise od.PlanError("freeze_embeddings: the model has no nn.Embedding to freeze")

    def preview(self, graph, plan, env):
        return self.record(modules=graph.modules_of_type(nn.Embedding))

    def apply(self, model, graph, plan, env):
        rec = self.record()
        for name in graph.modules_of_type(nn.Embedding):
            graph.module(name).weight.requires_grad_(False)
            rec.touch(name)
            rec.note(f"{name}: frozen")
        return rec


def main():
    torch.manual_seed(0)
    model = tiny(n_layers=2)
    plan = od.Plan(checkpointing=od.Checkpointing(), compile=od.Compile(backend="eager"))
    rt = od.accelerate(model, plan, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    print(rt.report)
    ids = torch.randint(0, 256, (4, 32))
    for step in range(3):
        loss = rt.model(input_ids=ids, labels=ids).loss
        rt.backward(loss)
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    assert not rt.model.embed_tokens.weight.requires_grad
    names = rt.report.names()
    assert names.index("checkpointing") < names.index("freeze_embeddings") < names.index("compile")


if __name__ == "__main__":
    main()
