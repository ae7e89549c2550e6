"""Trainable / frozen split of a model's parameters by regex rules over paths.

A parameter path is the slash-joined nnx path, e.g.
`image_encoder/blocks/3/Space_Adapter/D_fc1/kernel`. Rules are `(regex, trainable)`
pairs tried in order with `re.search`; the first match decides. Every parameter must be
matched by some rule (asserted), so each one lands in exactly one of the two subtrees.

Trainable and frozen parameters are held as nested dicts with string keys (one level per
path component). Only the trainable subtree gets optimizer state, is averaged and is sent.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

Rules = Sequence[tuple[str, bool]]

_ADAPTER = r"^image_encoder/.*(Space|MLP|Depth)_Adapter/"

PRESETS: dict[str, tuple[tuple[str, bool], ...]] = {
    # FedSAM: everything is trained and averaged.
    "fedsam": ((r".*", True),),
    # FedMSA (the original's choice): encoder adapters, prompt encoder, mask decoder and
    # any head outside the encoder (e.g. the multi-class `seg1` conv) are trained.
    "fedmsa": (
        (_ADAPTER, True),
        (r"^image_encoder/", False),
        (r".*", True),
    ),
    # Mask decoder (and heads outside encoder / prompt encoder) only.
    "decoder": (
        (r"^image_encoder/", False),
        (r"^prompt_encoder/", False),
        (r".*", True),
    ),
}


def path_to_str(key_path) -> str:
    """jax key path of a State leaf -> 'a/b/3/kernel' (the Variable's `.value` dropped)."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name in ("value", "raw_value"):
                continue
            parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


def nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b/kernel': leaf} -> {'a': {'b': {'kernel': leaf}}}."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *head, last = path.split("/")
        for p in head:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def get_path(tree: Mapping, path: str):
    """The leaf of a nested string-keyed dict at slash path `path`."""
    node = tree
    for p in path.split("/"):
        node = node[p]
    return node


def resolve_rules(preset_or_rules) -> tuple[tuple[str, bool], ...]:
    if isinstance(preset_or_rules, str):
        if preset_or_rules not in PRESETS:
            raise ValueError(f"unknown partition preset {preset_or_rules!r}; have {sorted(PRESETS)}")
        return PRESETS[preset_or_rules]
    rules = []
    for rule in preset_or_rules:
        regex, flag = rule
        if isinstance(flag, str):
            if flag not in ("trainable", "frozen"):
                raise ValueError(f"rule flag must be 'trainable'/'frozen' or bool, got {flag!r}")
            flag = flag == "trainable"
        rules.append((str(regex), bool(flag)))
    if not rules:
        raise ValueError("empty partition rules")
    return tuple(rules)


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which parameter leaves are trainable. Static (hashable by identity), shape-only."""

    treedef: Any  # treedef of the nnx.State of Params
    paths: tuple[str, ...]  # in treedef leaf order
    trainable: tuple[bool, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    rules: tuple[tuple[str, bool], ...]
    rule_of: tuple[int, ...]  # index of the rule that matched each path

    # ----- views ---------------------------------------------------------------------
    @property
    def trainable_paths(self) -> tuple[str, ...]:
        return tuple(p for p, t in zip(self.paths, self.trainable) if t)

    @property
    def frozen_paths(self) -> tuple[str, ...]:
        return tuple(p for p, t in zip(self.paths, self.trainable) if not t)

    def leaf_bytes(self, path: str) -> int:
        i = self.paths.index(path)
        return int(np.prod(self.shapes[i], dtype=np.int64)) * np.dtype(self.dtypes[i]).itemsize

    def count(self, trainable: bool = True) -> int:
        return sum(
            int(np.prod(s, dtype=np.int64))
            for s, t in zip(self.shapes, self.trainable) if t == trainable
        )

    def mask(self) -> dict:
        """Nested dict path -> bool, the full parameter tree's trainable mask."""
        return nest(dict(zip(self.paths, self.trainable)))

    # ----- split / merge -------------------------------------------------------------
    def split(self, params_state) -> tuple[dict, dict]:
        """nnx.State of Params -> (trainable, frozen) nested string-keyed dicts."""
        leaves = jax.tree.leaves(params_state)
        if len(leaves) != len(self.paths):
            raise ValueError(f"state has {len(leaves)} leaves, partition {len(self.paths)}")
        tr, fr = {}, {}
        for p, t, leaf in zip(self.paths, self.trainable, leaves):
            (tr if t else fr)[p] = leaf
        return nest(tr), nest(fr)

    def merge(self, trainable: Mapping, frozen: Mapping):
        """(trainable, frozen) -> nnx.State of Params, ready for nnx.merge."""
        leaves = [
            get_path(trainable if t else frozen, p) for p, t in zip(self.paths, self.trainable)
        ]
        return jax.tree.unflatten(self.treedef, leaves)

    def flatten_trainable(self, trainable: Mapping) -> list:
        """Trainable leaves in `trainable_paths` order."""
        return [get_path(trainable, p) for p in self.trainable_paths]

    def describe(self) -> str:
        lines = [f"trainable {self.count(True):,} / frozen {self.count(False):,} parameters"]
        for i, (regex, flag) in enumerate(self.rules):
            n = sum(
                int(np.prod(s, dtype=np.int64)) for s, r in zip(self.shapes, self.rule_of) if r == i
            )
            lines.append(f"  rule {i}: {regex!r} -> {'trainable' if flag else 'frozen'}: {n:,}")
        return "\n".join(lines)


def params_of(model_or_state):
    """Accept an nnx.Module (its nnx.Param state is taken) or an nnx.State of Params."""
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param)
    return model_or_state


def make_partition(params_state, preset_or_rules="fedsam") -> Partition:
    """Build the partition of an nnx.State of Params (or a Module) from a preset name
    ('fedsam' | 'fedmsa' | 'decoder') or a rules list [(regex, True|False|'trainable'|'frozen')].

    Raises ValueError naming every path no rule matches.
    """
    params_state = params_of(params_state)
    rules = resolve_rules(preset_or_rules)
    compiled = [re.compile(r) for r, _ in rules]
    kl, treedef = jax.tree_util.tree_flatten_with_path(params_state)
    paths, flags, rule_of, shapes, dtypes = [], [], [], [], []
    unmatched = []
    for key_path, leaf in kl:
        p = path_to_str(key_path)
        hit = next((i for i, rx in enumerate(compiled) if rx.search(p)), None)
        if hit is None:
            unmatched.append(p)
            continue
        paths.append(p)
        flags.append(rules[hit][1])
        rule_of.append(hit)
        shapes.append(tuple(leaf.shape))
        dtypes.append(np.dtype(leaf.dtype))
    if unmatched:
        raise ValueError(f"{len(unmatched)} parameters match no rule: {unmatched[:20]}")
    assert len(set(paths)) == len(paths), "duplicate parameter paths"
    assert len(paths) == len(kl), "every parameter must be covered exactly once"
    if not any(flags):
        raise ValueError("partition leaves no trainable parameter")
    return Partition(
        treedef=treedef,
        paths=tuple(paths),
        trainable=tuple(flags),
        shapes=tuple(shapes),
        dtypes=tuple(dtypes),
        rules=rules,
        rule_of=tuple(rule_of),
    )
