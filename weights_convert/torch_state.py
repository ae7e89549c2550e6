"""Move weights between a built Flax NNX model and a PyTorch-style state dict in memory.

Generic over every model in `fedfms_jax.models`: the PyTorch key of a Flax variable is
`rules.torch_key(path)` and the array is converted by `rules.to_flax` / `rules.to_torch`.
No per-model tables. (Files go through `convert` and `store`; this is for models that
already exist, e.g. parity tests against the PyTorch originals.)
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights_convert import rules


class LoadReport(NamedTuple):
    missing: list[str]  # Flax variables with no key in the state dict (left as they were)
    unexpected: list[str]  # state-dict keys no Flax variable asked for
    mismatched: list[str]  # "key: torch shape -> flax shape (expected ...)"


def _variables(model: nnx.Module):
    """(path, Variable) for every variable of the model, in graph order."""
    return [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]


def _is_torch_only(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in rules.TORCH_ONLY_SUFFIXES


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor slipped through: no torch import needed
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_state_dict(
    model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, strict: bool = True
) -> LoadReport:
    """Copy `state_dict` (PyTorch keys and layouts, numpy arrays) into `model` in place.

    Strict mode raises ValueError listing every missing, unexpected and mis-shaped key,
    and changes nothing. Non-strict mode loads what matches and returns the report.
    Values are cast to each variable's dtype.
    """
    updates = []
    missing, mismatched = [], []
    consumed = set()
    for path, var in _variables(model):
        key = rules.torch_key(path)
        if key not in state_dict:
            missing.append(key)
            continue
        consumed.add(key)
        value = rules.to_flax(path, _as_numpy(state_dict[key]))
        if tuple(value.shape) != tuple(var.get_value().shape):
            mismatched.append(
                f"{key}: state dict {tuple(_as_numpy(state_dict[key]).shape)} converts to "
                f"{tuple(value.shape)}, model expects {tuple(var.get_value().shape)}"
            )
            continue
        updates.append((var, value))
    unexpected = [k for k in state_dict if k not in consumed and not _is_torch_only(k)]
    report = LoadReport(missing, unexpected, mismatched)
    if strict and (missing or unexpected or mismatched):
        lines = ["state dict does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    {k}" for k in keys)
        raise ValueError("\n".join(lines))
    for var, value in updates:
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    return report


def export_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's variables as a PyTorch-layout state dict of numpy arrays.

    BatchNorm running statistics get the torch-only `num_batches_tracked` (int64 zero)
    next to them so that PyTorch's strict `load_state_dict` accepts the result.
    """
    out: dict[str, np.ndarray] = {}
    for path, var in _variables(model):
        key = rules.torch_key(path)
        out[key] = np.asarray(rules.to_torch(path, np.asarray(var.get_value())))
        if key.endswith(".running_mean"):
            out[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out
