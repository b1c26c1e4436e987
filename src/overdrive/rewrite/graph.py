"""ModuleGraph: the module tree as a networkx DiGraph, and repeated-block detection.

Nodes are qualified module names ("" is the root); an edge goes from a parent to each
child. Node attributes: ``module`` (the object), ``cls`` (class name), ``params`` and
``bytes`` (the module's *own* parameters, not its children's), ``dtype``, ``device``.

``blocks()`` finds the repeated blocks — decoder layers — that regional compilation,
activation checkpointing and FSDP act on one by one. Nothing here needs real weights:
a model on the meta device works the same.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict

import networkx as nx
import torch
from torch import nn

from ..errors import PlanError

CONTAINERS = (nn.ModuleList, nn.Sequential)


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank holds (a DTensor's local shard, not its global size)."""
    local = getattr(t, "_local_tensor", None)
    return (local if local is not None else t).numel()


def tensor_bytes(t: torch.Tensor) -> int:
    return local_numel(t) * t.element_size()


class ModuleGraph:
    def __init__(self, model: nn.Module, blocks: tuple[str, ...] | None = None):
        self.model = model
        self.g = nx.DiGraph()
        self._signature: dict[str, tuple] = {}
        self._seen_params: set[int] = set()  # tied weights are counted once
        for name, module in model.named_modules(remove_duplicate=False):
            self._add_node(name, module)
        self._blocks_override = blocks
        self._blocks: list[str] | None = None

    # -- construction ---------------------------------------------------------------
    def _add_node(self, name: str, module: nn.Module) -> None:
        own = [(n, p) for n, p in module.named_parameters(recurse=False)
               if id(p) not in self._seen_params]
        self._seen_params.update(id(p) for _, p in own)
        first = own[0][1] if own else None
        self.g.add_node(
            name,
            module=module,
            cls=type(module).__name__,
            params=sum(local_numel(p) for _, p in own),
            bytes=sum(tensor_bytes(p) for _, p in own),
            dtype=first.dtype if first is not None else None,
            device=first.device if first is not None else None,
        )
        if name:
            parent = name.rpartition(".")[0]
            self.g.add_edge(parent, name)

    # -- queries --------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def module(self, name: str) -> nn.Module:
        return self.g.nodes[name]["module"]

    def children(self, name: str) -> list[str]:
        return list(self.g.successors(name))

    def parent(self, name: str) -> str | None:
        preds = list(self.g.predecessors(name))
        return preds[0] if preds else None

    def names(self) -> list[str]:
        return list(self.g.nodes)

    def leaves(self) -> list[str]:
        return [n for n in self.g.nodes if self.g.out_degree(n) == 0]

    def subtree(self, name: str) -> list[str]:
        """``name`` and every module below it, in definition order."""
        return [name] + [n for n in nx.dfs_preorder_nodes(self.g, name) if n != name]

    def subtree_params(self, name: str) -> int:
        return sum(self.g.nodes[n]["params"] for n in self.subtree(name))

    def subtree_bytes(self, name: str) -> int:
        return sum(self.g.nodes[n]["bytes"] for n in self.subtree(name))

    def total_params(self) -> int:
        return sum(d["params"] for _, d in self.g.nodes(data=True))

    def total_bytes(self) -> int:
        return sum(d["bytes"] for _, d in self.g.nodes(data=True))

    def modules_of_type(self, *types: type) -> list[str]:
        return [n for n, d in self.g.nodes(data=True) if isinstance(d["module"], types)]

    def match(self, pattern: str) -> list[str]:
        """Qualified names equal to ``pattern`` or matching it as a dotted glob: ``*``
        matches one name segment (``model.layers.*`` is each layer, not its children),
        ``**`` any number of them (``**.mlp``: every ``mlp``)."""
        if pattern in self.g:
            return [pattern]
        return [n for n in self.g.nodes if n and glob_match(pattern, n)]

    # -- structure ------------------------------------------------------------------
    def signature(self, name: str) -> tuple:
        """Structural identity: class, own parameter shapes/dtypes, children's signatures."""
        sig = self._signature.get(name)
        if sig is None:
            module = self.module(name)
            own = tuple(
                (pname, tuple(p.shape), str(p.dtype))
                for pname, p in module.named_parameters(recurse=False)
            )
            kids = tuple(
                (child.rpartition(".")[2], self.signature(child)) for child in self.children(name)
            )
            sig = (type(module).__qualname__, own, kids)
            self._signature[name] = sig
        return sig

    def _group_key(self, name: str) -> tuple:
        """Siblings with the same key are one stack. A block class (a decoder layer, a
        T5 block) is enough: T5's first block owns the relative-position bias its
        siblings lack. Leaves and containers must match exactly (shapes included)."""
        module = self.module(name)
        if self.children(name) and not isinstance(module, CONTAINERS):
            return (type(module).__qualname__,)
        return self.signature(name)

    def repeated_groups(self) -> list[list[str]]:
        """Groups of >= 2 siblings of one block class (or identical leaves) inside a
        ModuleList/Sequential, largest total parameter count first (ties: more members,
        then earlier)."""
        groups: list[list[str]] = []
        for name, data in self.g.nodes(data=True):
            if not isinstance(data["module"], CONTAINERS):
                continue
            by_key: dict[tuple, list[str]] = defaultdict(list)
            for child in self.children(name):
                by_key[self._group_key(child)].append(child)
            groups.extend(members for members in by_key.values() if len(members) >= 2)
        order = {n: i for i, n in enumerate(self.g.nodes)}
        groups.sort(key=lambda m: (-self._group_params(m), -len(m), order[m[0]]))
        return groups

    def _group_params(self, members: list[str]) -> int:
        return sum(self.subtree_params(m) for m in members)

    def block_groups(self) -> list[list[str]]:
        """Every stack of repeated blocks, in model order: T5/BART's encoder and decoder
        layers, a vision and a text tower. A stack inside another stack's block (experts
        in a decoder layer) is not one, nor a stack under a tenth of the largest's size."""
        if self._blocks_override is not None:
            return group_by_parent(self.blocks())
        groups = [g for g in self.repeated_groups() if self._group_params(g) > 0]
        if not groups:
            return []
        floor = self._group_params(groups[0]) / 10
        chosen: list[list[str]] = []
        for members in groups:  # largest first: an enclosing stack is seen before its inner ones
            inside = any(is_within(members[0], m) for g in chosen for m in g)
            if not inside and self._group_params(members) >= floor:
                chosen.append(members)
        order = {n: i for i, n in enumerate(self.g.nodes)}
        return sorted(chosen, key=lambda g: order[g[0]])

    def blocks(self) -> list[str]:
        """The repeated blocks (e.g. ``model.layers.0`` … ``model.layers.31``; T5's
        ``encoder.block.*`` then ``decoder.block.*``), or ``[]``.

        The user's ``Plan.blocks`` override wins; otherwise every stack of
        ``block_groups()``.
        """
        if self._blocks is None:
            if self._blocks_override is not None:
                self._blocks = self._resolve_override(self._blocks_override)
            else:
                self._blocks = [b for g in self.block_groups() for b in g]
        return list(self._blocks)

    def _resolve_override(self, patterns: tuple[str, ...]) -> list[str]:
        found: list[str] = []
        for pattern in patterns:
            hits = self.match(pattern)
            if not hits:
                raise PlanError(
                    f"blocks: {pattern!r} matches no module of {type(self.model).__name__}; "
                    f"use qualified names or globs such as {self._example_glob()!r}"
                )
            found.extend(h for h in hits if h not in found)
        # a block nested in another chosen block would be wrapped twice
        chosen = set(found)
        for name in found:
            parent = name.rpartition(".")[0]
            while parent:
                if parent in chosen:
                    raise PlanError(
                        f"blocks: {name!r} lies inside {parent!r}; blocks must not nest: "
                        f"name one level, such as {self._example_glob()!r} (each '*' "
                        "matches one name segment)"
                    )
                parent = parent.rpartition(".")[0]
        return found

    def _example_glob(self) -> str:
        groups = self.repeated_groups()
        if groups:
            return groups[0][0].rpartition(".")[0] + ".*"
        return "layers.*"

    def non_block_leaves(self) -> list[str]:
        """Modules with parameters that lie outside every block (embeddings, norms, heads)."""
        inside = set()
        for b in self.blocks():
            inside.update(self.subtree(b))
        return [
            n for n, d in self.g.nodes(data=True)
            if n not in inside and d["params"] > 0
        ]

    def describe(self) -> str:
        blocks = self.blocks()
        head = f"{type(self.model).__name__}: {len(self)} modules, {self.total_params():,} params"
        if not blocks:
            return head + ", no repeated blocks"
        parts = [f"{len(g)} blocks under '{g[0].rpartition('.')[0]}' "
                 f"({self.g.nodes[g[0]]['cls']})" for g in group_by_parent(blocks)]
        return head + ", " + ", ".join(parts)


def is_within(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def group_by_parent(blocks: list[str]) -> list[list[str]]:
    """Blocks split into stacks by their container, in the given order."""
    groups: dict[str, list[str]] = {}
    for b in blocks:
        groups.setdefault(b.rpartition(".")[0], []).append(b)
    return list(groups.values())


def glob_match(pattern: str, name: str) -> bool:
    """Dotted-name glob: each ``*``-segment matches one segment, ``**`` zero or more."""
    return _match_segments(pattern.split("."), name.split("."))


def _match_segments(pat: list[str], parts: list[str]) -> bool:
    if not pat:
        return not parts
    head, rest = pat[0], pat[1:]
    if head == "**":
        return any(_match_segments(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match_segments(rest, parts[1:])


def parameter_owners(model: nn.Module) -> dict[int, set[str]]:
    """``id(parameter)`` → names of every module holding it directly; a tied weight
    (``lm_head.weight is embed_tokens.weight``) has several."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    return owners
