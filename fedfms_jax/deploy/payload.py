"""Trainable subtree <-> Flower ArrayRecord (one Array per leaf, keyed by its path).

Only the partition's trainable leaves travel (the adapters, prompt encoder and mask
decoder for FedMSA; everything for FedSAM). Flower 1.42 sends an ArrayRecord as
content-addressed objects, each Array cut into chunks of at most
FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE bytes (5 MB) pushed and pulled one request each, so
a 375 MB FedSAM update never needs a raised gRPC message limit.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from fedfms_jax.federated.partition import Partition, nest


def to_numpy_leaves(partition: Partition, trainable: Mapping) -> list[np.ndarray]:
    """Trainable leaves in `trainable_paths` order, as host numpy arrays."""
    return [np.asarray(jax.device_get(x)) for x in partition.flatten_trainable(trainable)]


def tree_to_record(partition: Partition, trainable: Mapping):
    from flwr.app import Array, ArrayRecord
    leaves = to_numpy_leaves(partition, trainable)
    return ArrayRecord({p: Array(x) for p, x in zip(partition.trainable_paths, leaves)})


def record_to_leaves(partition: Partition, record) -> list[np.ndarray]:
    """ArrayRecord -> leaves in `trainable_paths` order; checks names, shapes, dtypes."""
    expected = list(partition.trainable_paths)
    got = set(record.keys())
    missing, extra = [p for p in expected if p not in got], sorted(got - set(expected))
    if missing or extra:
        raise ValueError(f"payload does not match the trainable subtree: {len(missing)} missing "
                         f"(first {missing[:3]}), {len(extra)} unexpected (first {extra[:3]})")
    out = []
    for p in expected:
        x = record[p].numpy()
        i = partition.paths.index(p)
        if tuple(x.shape) != partition.shapes[i] or np.dtype(x.dtype) != np.dtype(partition.dtypes[i]):
            raise ValueError(f"payload leaf {p}: {x.dtype}{list(x.shape)}, expected "
                             f"{np.dtype(partition.dtypes[i])}{list(partition.shapes[i])}")
        out.append(x)
    return out


def leaves_to_tree(partition: Partition, leaves: Sequence[np.ndarray]) -> dict:
    return nest(dict(zip(partition.trainable_paths, leaves)))


def record_to_tree(partition: Partition, record) -> dict:
    return leaves_to_tree(partition, record_to_leaves(partition, record))


# ----------------------------------------------------------------- payload size check
def fedsam_payload_spec(encoder: str = "vit_b", image_size: int = 1024, prompt_free: bool = True):
    """(paths, shapes) of the FedSAM trainable subtree (every parameter) of a SAM, from
    shapes only (nnx.eval_shape: nothing allocated)."""
    from flax import nnx

    from fedfms_jax.federated.partition import make_partition
    from fedfms_jax.models.sam import SamConfig, build_sam
    cfg = SamConfig(encoder=encoder, image_size=image_size, prompt_free=prompt_free)
    model = nnx.eval_shape(lambda: build_sam(cfg, rngs=nnx.Rngs(0)))
    part = make_partition(nnx.state(model, nnx.Param), "fedsam")
    shapes = [part.shapes[part.paths.index(p)] for p in part.trainable_paths]
    return list(part.trainable_paths), shapes


def random_leaves(shapes, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


def digest(leaves: Sequence[np.ndarray]) -> str:
    import hashlib
    h = hashlib.sha256()
    for x in leaves:
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()
