"""Save on N ranks from a fully_shard-ed model, load on M (``save`` / ``load`` phases).

``save``: N-rank FSDP2 (done by hand, no pass needed), 2 AdamW steps, rt.export, an async
rt.save with one more step taken while it writes,
and rank 0 writes the full model + optimizer state (reference.pt) for comparison.
``load``: M ranks (M == 1: a plain model) load the checkpoint, gather the full state and
compare with the reference; od.load_weights also fills a meta-device sharded model from
the export. Rank 0 writes <out>/load-<M>.json, with how the ranks read the records
(direct, copied, unpickled: checkpoint_read.ReadCounts, summed over the ranks).
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import overdrive as od
from tests.checkpoint.ckpt_util import make_model, manual_runtime

phase, out = sys.argv[1], sys.argv[2]
world = int(os.environ.get("WORLD_SIZE", "1"))


def build(device="cpu"):
    with torch.device(device):
        model = make_model(2, seed=0)
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def full_state(rt):
    msd, osd = get_state_dict(rt.model, [rt.optimizer],
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    flat = {f"model.{k}": v.clone() for k, v in msd.items()}  # clones: the live step
    # tensors (and CPU tensors generally) are returned as they are, not copied
    for fqn, st in osd.get("state", {}).items():
        flat.update({f"optim.{fqn}.{k}": v.clone() for k, v in st.items()})
    return flat


rt = manual_runtime(model := build(), None)
rt.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
rank = rt.rank
if phase == "save":
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    def train_step():
        model(x, labels=x).loss.backward()
        rt.optimizer.step()
        rt.optimizer.zero_grad()
        rt.step += 1

    for _ in range(2):
        train_step()
    ref = full_state(rt)
    rt.export(f"{out}/export", max_shard_size="40KB")
    rt.save(f"{out}/ck", async_=True)  # written by a thread while training goes on
    train_step()
    rt.wait_for_save()
    if rank == 0:
        torch.save(ref, f"{out}/reference.pt")
else:
    from overdrive.runtime import checkpoint_files as cf

    reads, read_data = [], cf.SafeReader.read_data

    def spy(self, plan, planner):
        done = read_data(self, plan, planner)
        reads.append(self.counts)
        return done

    cf.SafeReader.read_data = spy
    rt.load(f"{out}/ck")
    cf.SafeReader.read_data = read_data
    counts = [(c.direct, c.copied, c.unpickled) for c in reads]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, counts)
        counts = [c for part in gathered for c in part]
    got = full_state(rt)  # collectives: every rank
    meta_model = build("meta")
    od.load_weights(meta_model, f"{out}/export")
    loaded = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
              for k, v in meta_model.state_dict().items()}
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    same_logits = torch.equal(meta_model(x).logits, rt.model(x).logits)
    if rank == 0:
        ref = torch.load(f"{out}/reference.pt", weights_only=True)
        diff = {k: (got[k].float() - ref[k].float()).abs().max().item() for k in ref}
        exported = {k: (v - ref[f"model.{k}"]).abs().max().item() for k, v in loaded.items()}
        with open(f"{out}/load-{world}.json", "w") as f:
            json.dump({"keys": sorted(got) == sorted(ref), "max_diff": max(diff.values()),
                       "differ": sorted(k for k, d in diff.items() if d)[:6],
                       "n": len(ref), "step": rt.step, "export_diff": max(exported.values()),
                       "export_logits_equal": same_logits,
                       "reads": [sum(c[i] for c in counts) for i in range(3)]}, f)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
