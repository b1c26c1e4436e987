"""A user pass with its own config, placed between the built-ins, shown in the report.

    python examples/custom_pass.py

`freeze_embeddings` runs when the plan holds a `FreezeEmbeddings` config, after activation
checkpointing and before compile: it freezes the token embeddings (a common fine-tuning
trick). Its decision — which embeddings — is what `od.inspect` previews and what
`od.accelerate` then does.
"""

from dataclasses import dataclass

import torch
from torch import nn

import overdrive as od
from overdrive.models.llama import tiny


@dataclass(frozen=True)
class FreezeEmbeddings:
    """The pass's config: in the plan, the pass runs; absent, it does not."""

    also_lm_head: bool = False  # tied heads share the embedding weight anyway


@od.register_pass("freeze_embeddings", config=FreezeEmbeddings, after=("checkpointing",),
                  before=("compile",))
class FreezeEmbeddingsPass(od.Pass):
    def check(self, ctx):
        names = ctx.graph.modules_of_type(nn.Embedding)
        if not names:
            raise od.PlanError("freeze_embeddings: the model has no nn.Embedding to freeze")
        if ctx.cfg.also_lm_head and "lm_head" in ctx.graph.names():
            names = [*names, "lm_head"]
        return od.Decision(modules=names, notes=[f"{n}: frozen" for n in names])

    def apply(self, model, decision, ctx):
        for name in decision.modules:  # exactly what check decided
            ctx.graph.module(name).weight.requires_grad_(False)


def main():
    torch.manual_seed(0)
    model = tiny(n_layers=2)
    plan = od.Plan(checkpointing=od.Checkpointing(), compile=od.Compile(backend="eager"),
                   extra=(FreezeEmbeddings(),))
    print(od.inspect(model, plan))  # the dry run shows the decision
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
