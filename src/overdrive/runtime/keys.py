"""State-dict keys as the user's model names them.

Wrappers torch adds (``torch.compile``'s ``_orig_mod.``, checkpoint wrappers,
FSDP1's ``_fsdp_wrapped_module.``) are stripped; a pass that renames keys on purpose hands
on a ``KeyMap`` (``Runtime`` applies it after this).
"""

from __future__ import annotations

WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_key(key: str) -> str:
    """A state-dict key without the prefixes wrappers add (compile, checkpoint wrappers)."""
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key
