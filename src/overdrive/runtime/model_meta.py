"""What ``rt.save`` records about the model so that ``overdrive export`` can turn the
checkpoint into a transformers directory without the training script.

``describe(rt)`` goes into the checkpoint's marker as ``"export"``:

- ``architecture``: the model's class name as the user built it (fully_shard and
  replicate rename the class; the report keeps the original);
- ``tied``: ``{key: kept key}`` for state-dict entries that are the same tensor (tied
  embeddings): the export stores them once, under the first name, as ``rt.export`` does;
- ``hf_config`` / ``generation_config``: the model's transformers configs as
  ``save_pretrained`` would write them, when it has them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("overdrive")


def describe(rt) -> dict[str, Any]:
    from .runtime import clean_key

    model = rt.model
    info: dict[str, Any] = {
        "architecture": getattr(rt.report, "model", None) or type(model).__name__,
        "tied": tied_keys(model, clean_key),
    }
    for name, attr in (("hf_config", "config"), ("generation_config", "generation_config")):
        config = _json_config(getattr(model, attr, None), name)
        if config is not None:
            info[name] = config
    return info


def tied_keys(model, clean_key) -> dict[str, str]:
    first: dict[int, str] = {}
    tied = {}
    for key, t in model.state_dict(keep_vars=True).items():
        key = clean_key(key)
        if id(t) in first:
            tied[key] = first[id(t)]
        else:
            first[id(t)] = key
    return tied


def _json_config(config: Any, name: str) -> dict[str, Any] | None:
    to_json = getattr(config, "to_json_string", None)
    if not callable(to_json):
        return None
    try:
        return json.loads(to_json(use_diff=True))
    except Exception as e:  # a config that does not serialise is noted, not fatal
        log.warning("overdrive: the model's %s could not be recorded in the checkpoint "
                    "(%s: %s); `overdrive export` will need --config", name,
                    type(e).__name__, e)
        return None
