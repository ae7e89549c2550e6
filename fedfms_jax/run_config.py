"""The training config: its fields and defaults, the tiny switch, and the checks every command runs.

Config files (`configs/<name>.py`, installed as `fedfms_jax.configs`) start from
`base_config()` or `federation_config(name, arg)`; `arg` selects `method` (fedsam | fedmsa),
`mode` (federated | centralized | local), `unseen` (index of the held-out site) and
`tiny` (a seconds-long run for tests), e.g. `--config prostate:method=fedsam,unseen=2`.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Mapping

import ml_collections

from fedfms_jax.cli_errors import UsageError
from fedfms_jax.data.registry import FEDERATIONS, federation_info

METHODS = ("fedmsa", "fedsam")
MODES = ("federated", "centralized", "local")
CLIENT_LOOPS = ("vmap", "sequential")
PLANS = ("auto", "off")
LOSSES = ("bce", "dice_bce")
LR_SCHEDULES = ("constant", "warmup_cosine")
ADAPTER_INITS = ("lecun", "torch_mean")
ARG_DEFAULTS = dict(method="fedmsa", mode="federated", unseen=0, tiny=False)
ARG_CHOICES = dict(method=METHODS, mode=MODES)
# init_from values that name no directory.
BUILTIN_INITS = ("random", "lite_medsam")
# Where the paper configs expect SAM ViT-B, converted by weights_convert (relative to the cwd).
SAM_VIT_B_DIR = "weights/sam_vit_b"
SAM_VIT_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"


def base_config() -> ml_collections.ConfigDict:
    """Every field a training config has, with its default."""
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
        kernels="auto"))            # compute paths: auto | cpu | gpu | reference (models/kernels.py)
    c.partition = ""           # trainable-parameter preset ("" = same as method)
    c.init_from = "random"     # random | lite_medsam | a weights_convert directory
    c.cache_embeddings = False # frozen encoder only: embed each image once, train the decoder on it
    # --- optimisation (the original: Adam 1e-4, BCEWithLogits pos_weight 2, FedAvg)
    c.rounds = 100
    c.local_epochs = 1
    c.local_steps = 0          # >0: fixed steps per round instead of epochs
    c.batch_size = 4
    c.lr = 1e-4
    # constant (the original) | warmup_cosine: linear warm-up over lr_warmup_rounds, then
    # cosine decay towards 0 at the last round, counted in each client's own optimizer
    # steps (needs local_steps > 0, so that every client's schedule spans the run; a client
    # that sits a round out runs that round behind).
    c.lr_schedule = "constant"
    c.lr_warmup_rounds = 0
    c.b1 = 0.9
    c.b2 = 0.999
    c.weight_decay = 0.0
    c.pos_weight = 2.0
    c.loss = "bce"             # bce (the original) | dice_bce (+ soft Dice: a signal when foreground is sparse)
    c.server_optimizer = "fedavg"
    c.server_lr = 1.0
    c.client_loop = "vmap"     # vmap: a device's clients at once; sequential: one at a time (less memory)
    c.plan = "off"             # auto: choose client_loop, remat and dtype that fit the device (memory_plan)
    c.plan_memory_gb = 0.0     # plan=auto: GB per device to plan for (0 = what the device reports)
    # --- evaluation and outputs
    c.eval_every = 5
    c.eval_batch_size = 8
    c.max_eval_images = 0      # 0 = all; >0 caps images per site (quick runs)
    c.num_overlays = 4
    c.checkpoint_keep = 3
    c.seed = 0
    c.tiny = False             # shrink the run to seconds (see apply_tiny); overrides still win
    # --- the original's model and training numerics (the "fedfms" protocol sets these)
    # ViT window padding before norm1, as the MSA/FedFMS originals; False: the order the
    # init_from weights record, else official SAM's (see model_init).
    c.model.pad_before_norm1 = False
    # How adapters the weights lack start: "lecun" (the model's init, one draw) or
    # "torch_mean" (PyTorch's nn.Linear default drawn per training client, then averaged).
    c.adapter_init = "lecun"
    add_protocol_fields(c)
    return c


def federation_config(federation: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """A federation's config with the original FedFMS settings, varied by `arg`."""
    args = parse_config_args(arg, ARG_DEFAULTS, ARG_CHOICES)
    info = federation_info(federation)
    c = base_config()
    c.name = f"{federation}_{args['method']}_{args['mode']}"
    c.federation = federation
    c.num_classes = info.num_classes
    c.unseen = args["unseen"]
    c.method = args["method"]
    c.mode = args["mode"]
    c.batch_size = info.batch_size(args["method"])
    # FedMSA: ViT-B with MSA adapters; FedSAM: every parameter trained, no adapters.
    c.model.adapters = args["method"] == "fedmsa"
    if info.paper:  # FedSAM/FedMSA fine-tune SAM: never a random ViT-B unless asked for
        c.init_from = SAM_VIT_B_DIR
        c.plan = "auto"  # ViT-B at 1024: the round settings that fit the device found
    c.protocol = "fedfms" if info.paper else "clean"
    apply_protocol(c)
    c.tiny = args["tiny"]
    return c


def with_plan_settings(cfg, settings: Mapping) -> ml_collections.ConfigDict:
    """A copy of `cfg` with a memory plan's settings (client_loop, remat, dtype) applied."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.client_loop = settings["client_loop"]
    out.model.remat = settings["remat"]
    out.model.dtype = settings["dtype"]
    return out


def apply_tiny(c: ml_collections.ConfigDict) -> None:
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
    c.protocol = "clean"


# ------------------------------------------------------------------------------ protocol: data side
# The original FedFMS code differs from today's clean choices in ways that change results;
# `protocol` picks one side for every such field at once (README "Protocol"): federation_config
# applies it, and config_cli again when --config.protocol is given or tiny makes it "clean",
# before the overrides, so an explicit --config.<field>= still wins. A trained model's
# slice layout is data.federations.data_slice_orientation(federation, slice_orientation).
PROTOCOLS = ("fedfms", "clean")
PROTOCOL_DATA_FIELDS = {      # field: (its value under fedfms, under clean, allowed values)
    "fundus_disc": ("rim", "full", ("rim", "full")),          # disc channel: disc minus cup, or whole disc
    "val_split": ("original", "patient", ("original", "patient")),  # data/preprocess.VAL_SPLITS
    "slice_orientation": ("xy", "yx", ("xy", "yx")),        # prostate slices [X, Y] or [Y, X]
    "resize": ("cv2", "pil", ("cv2", "pil")),                # data/preprocess.RESIZES
    "client_weights": ("rounded", "exact", ("rounded", "exact")),  # federated/fedavg_weights
}


def add_protocol_fields(c: ml_collections.ConfigDict) -> None:
    c.protocol = "clean"
    for field, (_, clean, _) in PROTOCOL_DATA_FIELDS.items():
        setattr(c, field, clean)


def apply_protocol(c: ml_collections.ConfigDict) -> None:
    """Set every protocol field to the preset `c.protocol` names (unknown names: validate says)."""
    if c.get("protocol") not in PROTOCOLS:
        return
    side = PROTOCOLS.index(c.protocol)
    for field, values in PROTOCOL_DATA_FIELDS.items():
        setattr(c, field, values[side])
    # Model side: the MSA original pads windows before norm1 (a ViT's FedMSA only), and
    # starts from the mean of every client's PyTorch-default adapter draw.
    original = c.protocol == "fedfms"
    c.model.pad_before_norm1 = original and c.method == "fedmsa" and c.model.encoder != "tiny_vit"
    c.adapter_init = "torch_mean" if original else "lecun"


def check_protocol(cfg) -> None:
    if cfg["protocol"] not in PROTOCOLS:
        raise UsageError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {cfg['protocol']!r}")
    for field, (_, _, allowed) in PROTOCOL_DATA_FIELDS.items():
        if cfg[field] not in allowed:
            raise UsageError(f"{field} must be one of {', '.join(allowed)}, got {cfg[field]!r}")


# ------------------------------------------------------------------------------ text values
def parse_config_args(arg: str | None, defaults: Mapping, choices: Mapping | None = None) -> dict:
    """'method=fedmsa,unseen=2' -> dict, typed like `defaults`; unknown keys and values rejected."""
    out = dict(defaults)
    for item in (arg or "").split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise UsageError(f"config argument '{item}' is not key=value")
        if key not in defaults:
            raise UsageError(f"unknown config argument '{key}' (known: {', '.join(sorted(defaults))})")
        out[key] = coerce(value.strip(), defaults[key], key)
        if key in (choices or {}) and out[key] not in choices[key]:
            raise UsageError(f"{key} must be one of {', '.join(choices[key])} (config argument), "
                             f"got '{out[key]}'")
    return out


def coerce(text: str, like, name: str):
    """Parse `text` as the type of the existing value `like`."""
    try:
        if isinstance(like, bool):
            low = text.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, str):
            return text
        if isinstance(like, (tuple, list)):
            value = ast.literal_eval(text) if text else ()
            value = value if isinstance(value, (tuple, list)) else (value,)
            return type(like)(value)
        if like is None:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except (ValueError, SyntaxError):
        pass
    raise UsageError(f"config field '{name}': cannot parse '{text}' as {type(like).__name__}")


def from_json(doc: Mapping) -> ml_collections.ConfigDict:
    """A config saved as JSON (a work dir's config.json) back as a ConfigDict.

    Fields the saved config lacks (it predates them) take today's defaults; lists come
    back as the tuples the fields hold.
    """
    def fill(node: ml_collections.ConfigDict, values: Mapping) -> None:
        for key, value in values.items():
            if isinstance(value, Mapping):
                if key not in node:
                    node[key] = ml_collections.ConfigDict()
                fill(node[key], value)
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    c = base_config()
    fill(c, doc)
    return c


# ------------------------------------------------------------------------------ checks
def validate(cfg) -> None:
    """Every check a config must pass before anything is built or written (UsageError)."""
    missing = [key for key in base_config() if key not in cfg]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UsageError(f"not a training config: it has no field {', '.join(missing[:3])}{more}")
    checks = [
        (cfg["method"] in METHODS, f"method must be fedmsa or fedsam, got {cfg['method']!r}"),
        (cfg["mode"] in MODES, f"mode must be federated, centralized or local, got {cfg['mode']!r}"),
        (cfg["federation"] in FEDERATIONS,
         f"unknown federation {cfg['federation']!r}; known: {', '.join(FEDERATIONS)}"),
        (cfg["rounds"] >= 1, "rounds must be >= 1"),
        (cfg["batch_size"] >= 1 and cfg["eval_batch_size"] >= 1, "batch sizes must be >= 1"),
        (cfg["local_epochs"] >= 1, "local_epochs must be >= 1"),
        (cfg["eval_every"] >= 1, "eval_every must be >= 1"),
        (cfg["lr"] > 0, "lr must be > 0"),
        (cfg["lr_schedule"] in LR_SCHEDULES,
         f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg['lr_schedule']!r}"),
        (cfg["loss"] in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}"),
        (cfg["client_loop"] in CLIENT_LOOPS,
         f"client_loop must be vmap or sequential, got {cfg['client_loop']!r}"),
        (cfg["plan"] in PLANS, f"plan must be auto or off, got {cfg['plan']!r}"),
        (cfg["plan_memory_gb"] >= 0, "plan_memory_gb must be >= 0 (0: the device's own memory)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
    check_lr_schedule(cfg)
    check_protocol(cfg)
    check_geometry(cfg["image_size"], cfg["model"]["encoder"])
    check_init_from(cfg["init_from"])
    check_original_numerics(cfg)


def check_lr_schedule(cfg) -> None:
    """A schedule counts local steps: it needs a fixed number per round to know the run's end."""
    warmup = cfg["lr_warmup_rounds"]
    if cfg["lr_schedule"] == "constant":
        if warmup:
            raise UsageError("lr_warmup_rounds needs lr_schedule=warmup_cosine (lr_schedule is constant)")
        return
    if cfg["local_steps"] < 1:
        raise UsageError(f"lr_schedule={cfg['lr_schedule']} needs local_steps >= 1 (a fixed number of "
                         "steps per round; in epoch mode clients take different numbers of steps)")
    if not 0 <= warmup < cfg["rounds"]:
        raise UsageError(f"lr_warmup_rounds must be in 0..rounds-1 ({cfg['rounds'] - 1}), got {warmup}")


def check_geometry(size: int, encoder: str) -> None:
    """Reject image sizes the encoder cannot take."""
    patch = 1 if encoder == "tiny_vit" else 16
    if size <= 0 or size % patch or size % 4:
        raise UsageError(f"image_size {size} is not divisible by the encoder's patch size {patch} "
                         f"(and by 4 for the low-res masks)")
    if encoder == "tiny_vit" and size % 64:
        raise UsageError(f"image_size {size} must be a multiple of 64 for the TinyViT encoder")


def check_original_numerics(cfg) -> None:
    """The padding order exists for ViT encoders only; adapters start one way."""
    m = cfg["model"]
    if cfg["adapter_init"] not in ADAPTER_INITS:
        raise UsageError(f"adapter_init must be lecun or torch_mean, got {cfg['adapter_init']!r}")
    if cfg["adapter_init"] == "torch_mean" and m["adapter_zero_init"]:
        raise UsageError("adapter_init=torch_mean and model.adapter_zero_init=true contradict each other")
    if m["pad_before_norm1"] and m["encoder"] == "tiny_vit":
        raise UsageError("model.pad_before_norm1 applies to ViT encoders only (encoder is tiny_vit)")


def check_init_from(init_from: str) -> None:
    """A weights directory must be there; the paper configs' default says how to make it."""
    if init_from in BUILTIN_INITS:
        return
    path = Path(init_from)
    if not path.is_dir():
        if init_from == SAM_VIT_B_DIR:
            raise UsageError(
                f"init_from: weights directory {init_from} does not exist; to get SAM ViT-B: download "
                f"{SAM_VIT_B_URL}, run `python -m weights_convert convert --checkpoint sam_vit_b_01ec64.pth "
                f"--out {SAM_VIT_B_DIR}`, then pass --config.init_from={SAM_VIT_B_DIR} (or run from the "
                f"folder holding weights/); --config.init_from=random trains from scratch")
        raise UsageError(f"init_from: weights directory {init_from} does not exist "
                         f"(make one with `python -m weights_convert convert --checkpoint CKPT --out DIR`)")
    if not (path / "model.json").is_file():
        raise UsageError(f"init_from: {path} has no model.json (expected a weights_convert output)")
