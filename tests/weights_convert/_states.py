"""Random PyTorch-layout state dicts for any SamConfig, and small file helpers."""
from __future__ import annotations

import numpy as np

from weights_convert import rules
from weights_convert.convert import NON_PERSISTENT
from weights_convert.store import abstract_model, model_variables


def torch_shapes(config) -> dict[str, tuple]:
    """PyTorch key -> shape of every state-dict entry of the model `config` describes."""
    out = {}
    for path, var in model_variables(abstract_model(config)):
        if rules.torch_key(path) in NON_PERSISTENT:  # not in PyTorch state dicts
            continue
        dummy = np.broadcast_to(np.float32(0), var.get_value().shape)
        out[rules.torch_key(path)] = tuple(rules.to_torch(path, dummy).shape)
    return out


def random_state(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic weights of a sensible scale: N(0, 1/fan_in) matrices, 1 + N(0, 0.01)
    norm scales, N(0, 0.01) vectors; keys drawn in sorted order."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in sorted(torch_shapes(config).items()):
        z = rng.standard_normal(shape)
        if len(shape) >= 2:
            z = z / np.sqrt(max(1, int(np.prod(shape[1:]))))
        elif key.endswith(".weight"):
            z = 1.0 + 0.1 * z
        else:
            z = 0.1 * z
        out[key] = z.astype(np.float32)
    return out


def save_torch(state: dict, path) -> None:
    import torch

    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
