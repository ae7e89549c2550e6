"""Synthetic federation (generated in memory): a quick run of the whole pipeline without downloads.

--config synthetic[:method=...,mode=...,unseen=I,tiny=true]
"""
from fedfms_jax.run_config import federation_config


def get_config(arg=None):
    c = federation_config("synthetic", arg)
    # Small by default: a tiny ViT at 64 px trains in about a minute on a CPU (tiny=true
    # shrinks it further).
    c.image_size = 64
    c.model.encoder = "vit_tiny"
    c.rounds = 10
    c.local_steps = 4
    c.batch_size = 4
    c.lr = 1e-3
    c.eval_every = 2
    return c
