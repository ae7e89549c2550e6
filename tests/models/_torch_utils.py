"""Helpers for PyTorch-parity tests: deterministic random weights in PyTorch layout and
loading a PyTorch-layout state dict into a Flax NNX module via weights_convert.rules.

Nothing here imports torch: state dicts are dicts of numpy arrays.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights_convert.rules import TORCH_ONLY_SUFFIXES, to_flax, to_torch, torch_key


def rel_err(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def torch_shapes(module: nnx.Module) -> dict[str, tuple]:
    """PyTorch key -> PyTorch shape for every nnx.Param of `module` (works on eval_shape)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        zeros = np.zeros(var.shape, np.float32)
        out[torch_key(path)] = to_torch(path, zeros).shape
    return out


def random_torch_state(module: nnx.Module, seed: int) -> dict[str, np.ndarray]:
    """Deterministic non-trivial weights (PyTorch layout) for every parameter of `module`.

    Linear/conv weights ~ N(0, 1/fan_in); biases, rel_pos, pos_embed and LayerNorm
    shifts ~ N(0, 0.1^2)-ish; LayerNorm scales ~ 1 + N(0, 0.1^2). Keys are drawn in
    sorted order so the result depends only on the seed and the architecture.
    """
    rng = np.random.default_rng(seed)
    shapes = torch_shapes(module)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        z = rng.standard_normal(shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "weight" and len(shape) >= 2:  # linear (out, in) or conv (O, I, kh, kw)
            fan_in = int(np.prod(shape[1:]))
            val = z / np.sqrt(fan_in)
        elif leaf == "weight":  # LayerNorm / LayerNorm2d scale
            val = 1.0 + 0.1 * z
        elif leaf in ("rel_pos_h", "rel_pos_w", "pos_embed"):
            val = 0.2 * z
        else:  # biases
            val = 0.1 * z
        state[key] = val.astype(np.float32)
    return state


def load_torch_state_into_flax(module: nnx.Module, state_dict, prefix: str = "") -> None:
    """Copy a PyTorch-layout state dict (numpy or torch tensors) into `module` in place.

    `prefix` is prepended to every Flax-derived key (e.g. 'image_encoder.'). Fails
    listing every missing, unexpected or mis-shaped key.
    """
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
          for k, v in state_dict.items() if k.startswith(prefix)}
    params = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(params)
    missing, bad_shape, used, new = [], [], set(), []
    for path, var in flat:
        key = prefix + torch_key(path)
        if key not in sd:
            missing.append(key)
            continue
        val = to_flax(path, sd[key])
        if tuple(val.shape) != tuple(var.shape):
            bad_shape.append(f"{key}: torch->{val.shape} vs flax {var.shape}")
        used.add(key)
        new.append((path, jnp.asarray(val, dtype=jnp.float32)))
    unexpected = [k for k in sd if k not in used and not k.endswith(TORCH_ONLY_SUFFIXES)]
    if missing or unexpected or bad_shape:
        raise KeyError(f"missing={missing} unexpected={unexpected} bad_shape={bad_shape}")
    pure = nnx.to_pure_dict(params)
    for path, val in new:
        node = pure
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = val
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(module, params)


def torch_state_from_flax(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's own parameters as a PyTorch-layout state dict (numpy)."""
    return {
        torch_key(path): np.asarray(to_torch(path, np.asarray(var[...])))
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }
