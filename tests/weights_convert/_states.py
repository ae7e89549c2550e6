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
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in torch_shapes(config).items()}


def save_torch(state: dict, path) -> None:
    import torch

    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
