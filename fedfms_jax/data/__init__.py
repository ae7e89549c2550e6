"""Datasets (TFDS builders, a real demo federation, a synthetic one) and the input pipeline.

Heavy modules (tensorflow_datasets, jax) are imported lazily so that importing the
package stays cheap.
"""
from fedfms_jax.data.errors import DataError

__all__ = ["DataError", "Federation", "get_federation", "FEDERATIONS", "FederatedLoader", "AugmentConfig"]


def __getattr__(name):
    if name in ("Federation", "get_federation", "FEDERATIONS"):
        from fedfms_jax.data import federations
        return getattr(federations, name)
    if name in ("FederatedLoader", "AugmentConfig"):
        from fedfms_jax.data import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)
