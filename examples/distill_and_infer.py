"""Distil a frozen teacher into a student, then run distributed inference — the runtime
helpers people bring from Accelerate, in overdrive.

    overdrive launch --nproc 2 examples/distill_and_infer.py --out out/distill
    overdrive launch --nproc 2 examples/distill_and_infer.py --plan ddp --comm-hook fp16
    overdrive export out/distill/ck out/distill/hf --dtype bf16   # offline, no script
    overdrive inspect --config out/distill/hf/config.json --plan fsdp --world-size 8

What it shows:
- two ``od.accelerate`` calls in one process: the teacher (``optimizer=None``, frozen)
  reuses the student's process group and mesh; ``rt.accumulate`` of the student leaves
  it alone;
- ``od.DDP(comm_hook="fp16" | "powersgd")`` with ``--plan ddp --comm-hook ...``;
- ``rt.scheduler``: steps once per optimizer step whatever ``grad_accum`` is;
- ``rt.register_for_checkpointing``: an EMA of the student saved and restored by
  ``rt.save`` / ``rt.load``;
- ``rt.set_trigger`` / ``rt.check_trigger``: a stop decided on one rank, seen by all;
- ``rt.split_between_processes``: prompts split over the ranks, results gathered back in
  order.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import overdrive as od

VOCAB = 128


def build(seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class EMA:
    """An exponential moving average of the student's full weights: every rank holds the
    same copy, so rt.save stores it once (registered objects are replicated state)."""

    def __init__(self, rt, decay: float = 0.9):
        self.decay, self.shadow = decay, rt.state_dict()

    def update(self, rt) -> None:
        for k, v in rt.state_dict().items():  # a collective: every rank calls it
            self.shadow[k].mul_(self.decay).add_(v, alpha=1 - self.decay)

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state) -> None:
        self.decay, self.shadow = state["decay"], state["shadow"]


def student_plan(args) -> od.Plan:
    if args.plan == "ddp":
        return od.Plan(ddp=od.DDP(comm_hook=args.comm_hook), grad_accum=2)
    return od.Plan(fsdp=od.FSDP(), grad_accum=2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", default="fsdp", choices=["fsdp", "ddp"])
    parser.add_argument("--comm-hook", default=None, choices=["fp16", "powersgd"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--stop-kl", type=float, default=0.5, help="early-stop threshold")
    parser.add_argument("--out", default="out/distill")
    args = parser.parse_args()
    out = Path(args.out)

    rt = od.accelerate(build(0), student_plan(args),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
                       scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
                           o, lambda n: 1 - n / args.steps))
    teacher = build(1).requires_grad_(False).eval()
    rt_teacher = od.accelerate(teacher, args.plan)  # optimizer=None: forward only
    rt.print(f"student: {' → '.join(rt.report.names())}; teacher: "
             f"{' → '.join(rt_teacher.report.names())}; one mesh: {rt.mesh is rt_teacher.mesh}")

    ema = EMA(rt)
    rt.register_for_checkpointing(ema)
    g = torch.Generator().manual_seed(100 + rt.dp_rank)
    while rt.step < args.steps:
        with rt.accumulate():
            ids = torch.randint(0, VOCAB, (2, 32), generator=g)
            with torch.no_grad():
                target = F.log_softmax(rt_teacher.model(input_ids=ids).logits, -1)
            student = F.log_softmax(rt.model(input_ids=ids).logits, -1)
            loss = F.kl_div(student, target, log_target=True, reduction="batchmean")
            rt.backward(loss)
            rt.optimizer.step()
            rt.scheduler.step()
            rt.optimizer.zero_grad()
        if not rt.sync_gradients:
            continue
        ema.update(rt)
        kl = rt.reduce(loss.detach(), "mean").item()
        rt.print(f"step {rt.step}: kl {kl:.4f}, lr {rt.scheduler.get_last_lr()[0]:.2e}")
        if rt.rank == rt.world_size - 1 and kl < args.stop_kl:  # one rank's condition...
            rt.set_trigger()
        if rt.check_trigger():  # ...stops every rank at the same step
            rt.print("early stop")
            break
    rt.save(out / "ck")
    rt.print(f"saved {out / 'ck'}; EMA restored by rt.load: {restored_ema(ema, out / 'ck', args)}")

    prompts = [f"prompt {i}" for i in range(5)]
    with rt.split_between_processes(prompts, apply_padding=True) as mine:
        ids = torch.tensor([[sum(map(ord, p)) % VOCAB] * 8 for p in mine])  # "tokenize"
        with torch.no_grad():
            first = rt.model(input_ids=ids).logits[:, -1].argmax(-1)
    answers = rt.gather(first)[: len(prompts)]  # padding dropped: one answer per prompt
    rt.print(f"{len(answers)} answers for {len(prompts)} prompts: {answers.tolist()}")


def restored_ema(ema, path, args) -> bool:
    """A fresh student + EMA, restored from the checkpoint, holds the same EMA."""
    rt2 = od.accelerate(build(0), student_plan(args),
                        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
                        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
                            o, lambda n: 1 - n / args.steps))
    ema2 = EMA(rt2)
    rt2.register_for_checkpointing(ema2)
    rt2.load(path)
    return all(torch.equal(ema2.shadow[k], v) for k, v in ema.shadow.items())


if __name__ == "__main__":
    main()
