"""Child process: load an export into a meta Llama with od.accelerate(weights=...), run it,
print JSON with the peak resident memory above the baseline.

The peak is the kernel's high-water mark of this process's own memory (VmHWM in
/proc/self/status, reset to the current RSS at the baseline through clear_refs).
resource.ru_maxrss cannot be used here: it survives fork+exec, so a child of a large
pytest process reports at least its parent's size.

argv: export_dir mode(offload|stream) cpu_budget_bytes offload_folder
"""

import json
import sys

import psutil
import torch

import overdrive as od
from tests.offload.offload_common import build

export, mode, budget, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
from transformers import AutoConfig  # noqa: E402

cfg = AutoConfig.from_pretrained(export)
model = build(cfg, meta=True)
ids = torch.randint(0, cfg.vocab_size, (1, 16))
od.accelerate, od.Offload  # noqa: B018 - `import overdrive` is lazy: import the code now
with torch.no_grad():
    torch.zeros(64, 64) @ torch.zeros(64, 64)  # first-call allocations happen before the baseline


def high_water_mark() -> int:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM to the current RSS
baseline = psutil.Process().memory_info().rss
if mode == "offload":
    plan = od.Plan(offload=od.Offload(max_memory={"cpu": budget, "disk": "100GiB"},
                                      offload_folder=folder))
else:
    plan = None
od.accelerate(model, plan, weights=export)
after_load = high_water_mark()
if mode == "offload":
    with torch.no_grad():
        model(ids)
        model.generate(ids, max_new_tokens=4, do_sample=False)
peak = high_water_mark()
print(json.dumps({"baseline": baseline, "peak_above_baseline": peak - baseline,
                  "load_peak_above_baseline": after_load - baseline}))
