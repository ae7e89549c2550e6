"""Fields shared by every training config, and the original FedFMS settings.

`federation_config(name, arg)` builds a config for one federation; `arg` selects
`method` (fedsam | fedmsa), `mode` (federated | centralized | local), `unseen` (index
of the held-out site) and `tiny` (a seconds-long run for tests), e.g.
`--config configs/prostate.py:method=fedsam,unseen=2`.
"""
from __future__ import annotations

import ml_collections

from fedfms_jax.config_cli import parse_config_args

# Per federation: classes, and the original's local batch sizes (FedMSA, FedSAM).
FEDERATIONS = {
    "prostate": dict(num_classes=1, batch_fedmsa=4, batch_fedsam=6),
    "fundus": dict(num_classes=2, batch_fedmsa=4, batch_fedsam=6),
    "nuclei": dict(num_classes=1, batch_fedmsa=4, batch_fedsam=6),
    "fets": dict(num_classes=1, batch_fedmsa=8, batch_fedsam=6),
    "ctlung": dict(num_classes=1, batch_fedmsa=4, batch_fedsam=6),
    "isic": dict(num_classes=1, batch_fedmsa=4, batch_fedsam=6),
    "chaos": dict(num_classes=1, batch_fedmsa=4, batch_fedsam=6),
    "nuclei_demo": dict(num_classes=1, batch_fedmsa=4, batch_fedsam=4),
    "synthetic": dict(num_classes=1, batch_fedmsa=2, batch_fedsam=2),
}
METHODS = ("fedmsa", "fedsam")
MODES = ("federated", "centralized", "local")
ARG_DEFAULTS = dict(method="fedmsa", mode="federated", unseen=0, tiny=False)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = ""
    # --- data
    c.federation = "synthetic"
    c.data_dir = ""            # prepared TFDS data ("" = the library default)
    c.manual_dir = ""          # raw downloads for federations that need them
    c.image_size = 1024
    c.num_classes = 1
    c.unseen = 0               # index of the held-out site (-1 = last; None-like: see `no_unseen`)
    c.no_unseen = False        # train on every site, evaluate no unseen site
    c.sites = ()               # subset of site names to use (empty = all)
    c.synthetic_sites = 4      # synthetic federation only: sites and images per site
    c.synthetic_images = 16
    # --- method
    c.method = "fedmsa"        # fedmsa: adapters + prompt encoder + decoder; fedsam: everything
    c.mode = "federated"       # federated | centralized (pooled sites) | local (no aggregation)
    c.model = ml_collections.ConfigDict(dict(
        encoder="vit_b", tiny_vit="", adapters=True, adapter_zero_init=False,
        prompt_free=True, pixel_norm="unit", dtype="float32", remat=False,
        kernels="auto"))  # auto | cpu | gpu | reference (fedfms_jax/models/kernels.py)
    c.partition = ""           # trainable-parameter preset ("" = same as method)
    c.init_from = "random"     # random | lite_medsam | a weights_convert directory
    c.cache_embeddings = False # frozen encoder only: embed each image once, train the decoder on it
    # --- optimisation (the original: Adam 1e-4, BCEWithLogits pos_weight 2, FedAvg)
    c.rounds = 100
    c.local_epochs = 1
    c.local_steps = 0          # >0: fixed steps per round instead of epochs
    c.batch_size = 4
    c.lr = 1e-4
    c.b1 = 0.9
    c.b2 = 0.999
    c.weight_decay = 0.0
    c.pos_weight = 2.0
    c.server_optimizer = "fedavg"
    c.server_lr = 1.0
    c.client_loop = "vmap"     # vmap: a device's clients at once; sequential: one at a time (less memory)
    # --- evaluation and outputs
    c.eval_every = 5
    c.eval_batch_size = 8
    c.max_eval_images = 0      # 0 = all; >0 caps images per site (quick runs)
    c.num_overlays = 4
    c.checkpoint_keep = 3
    c.seed = 0
    c.tiny = False
    return c


def apply_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any config to a seconds-long run: tiny ViT, 64 px, synthetic data, 2 rounds."""
    c.federation = "synthetic"
    c.data_dir = ""
    c.manual_dir = ""
    c.image_size = 64
    c.model.encoder = "vit_tiny"
    c.model.tiny_vit = ""
    c.init_from = "random"
    c.rounds = 2
    c.local_epochs = 1
    c.local_steps = 2
    c.batch_size = 2
    c.eval_every = 1
    c.eval_batch_size = 4
    c.max_eval_images = 4
    c.num_overlays = 2
    c.lr = 1e-3
    c.sites = ()
    return c


def federation_config(federation: str, arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_args(arg, ARG_DEFAULTS)
    if args["method"] not in METHODS:
        from fedfms_jax.cli_errors import UsageError
        raise UsageError(f"method must be one of {METHODS}, got '{args['method']}'")
    if args["mode"] not in MODES:
        from fedfms_jax.cli_errors import UsageError
        raise UsageError(f"mode must be one of {MODES}, got '{args['mode']}'")
    info = FEDERATIONS[federation]
    c = base_config()
    c.name = f"{federation}_{args['method']}_{args['mode']}"
    c.federation = federation
    c.num_classes = info["num_classes"]
    c.unseen = args["unseen"]
    c.method = args["method"]
    c.mode = args["mode"]
    c.batch_size = info[f"batch_{args['method']}"]
    # FedMSA: ViT-B with MSA adapters; FedSAM: every parameter trained, no adapters.
    c.model.adapters = args["method"] == "fedmsa"
    c.tiny = args["tiny"]
    if c.tiny:
        apply_tiny(c)
    return c
