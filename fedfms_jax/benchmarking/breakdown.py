"""Profile mode: where a local step's time goes, part by part, JAX beside PyTorch.

Each part runs on one client's batch (`batch` images): image-encoder forward, whole-model
forward, forward + backward, one optimizer step (forward, backward, Adam), and for
PyTorch also the deep copy of the model. Parts alternate between the frameworks so both
see the same background load.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedfms_jax.benchmarking.encoder import compute_dtype
from fedfms_jax.benchmarking.federated_round import synthetic_round
from fedfms_jax.benchmarking.jax_side import build_model
from fedfms_jax.benchmarking.stats import time_alternating
from fedfms_jax.federated.client import make_loss_fn, make_train_step
from fedfms_jax.federated.partition import make_partition
from fedfms_jax import losses


def _jax_parts(cfg, dtype_name, batch) -> dict:
    from fedfms_jax.models.sam import preprocess

    model, forward, scfg = build_model(cfg, dtype_name)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    partition = make_partition(params, cfg.method)
    trainable, frozen = partition.split(params)
    loss = losses.get_loss("bce", pos_weight=2.0)
    tx = optax.adam(1e-4)
    opt_state = tx.init(trainable)
    images = jnp.asarray(batch["image"])

    @jax.jit
    def encoder_fwd(params, images):
        return nnx.merge(graphdef, params, rest).image_encoder(preprocess(images, scfg.pixel_norm))

    @jax.jit
    def model_fwd(params, images):
        return forward(nnx.merge(graphdef, params, rest), images)

    grad_fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, partition, forward, loss), has_aux=True))
    step = jax.jit(make_train_step(graphdef, partition, forward, loss, tx))
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    return {
        "image encoder forward": lambda: jax.block_until_ready(encoder_fwd(params, images)),
        "model forward": lambda: jax.block_until_ready(model_fwd(params, images)),
        "forward + backward": lambda: jax.block_until_ready(grad_fn(trainable, frozen, rest, trainable, jb)),
        "train step (fwd, bwd, Adam)": lambda: jax.block_until_ready(
            step(trainable, opt_state, frozen, rest, trainable, jb)),
    }


def _torch_parts(cfg, batch) -> dict:
    import torch

    from fedfms_jax.benchmarking.torch_side import build_torch_model, torch_device
    from fedfms_jax.reference.torch_original_round import set_trainable

    torch.set_num_threads(cfg.threads or __import__("os").cpu_count())
    device = torch_device()
    model = build_torch_model(cfg).to(device)
    set_trainable(model, cfg.method)
    model.train()
    x = (torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))).to(device).float() / 255.0)
    y = torch.from_numpy(np.ascontiguousarray(batch["mask"].transpose(0, 3, 1, 2))).to(device).float()
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones([1], device=device) * 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def encoder_fwd():
        with torch.no_grad():
            model.image_encoder(x)
        sync()

    def model_fwd():
        model(x)
        sync()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        sync()

    def train_step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sync()

    def deep_copy():
        copy.deepcopy(model)
        sync()

    return {
        "image encoder forward": encoder_fwd,
        "model forward": model_fwd,
        "forward + backward": fwd_bwd,
        "train step (fwd, bwd, Adam)": train_step,
        "deep copy of the model": deep_copy,
    }


def run_profile(cfg) -> dict:
    dtype_name, _ = compute_dtype(cfg.dtype)
    full = synthetic_round(cfg)
    batch = {k: v[0, 0] for k, v in full.items()}
    jparts = _jax_parts(cfg, dtype_name, batch)
    tparts = _torch_parts(cfg, batch) if cfg.torch else {}
    names = list(dict.fromkeys(list(jparts) + list(tparts)))
    rows = {}
    for name in names:
        fns = [f for f in (jparts.get(name), tparts.get(name)) if f is not None]
        timings = time_alternating(fns, warmup=1, repeats=[cfg.repeats] * len(fns))
        it = iter(timings)
        rows[name] = {
            "jax": next(it).as_dict() if name in jparts else None,
            "torch": next(it).as_dict() if name in tparts else None,
        }
    return {"mode": "profile", "dtype": dtype_name, "parts": rows}


def format_profile(r: dict) -> str:
    c = r["config"]
    lines = [f"profile of one local step: {c['method']} {c['variant']} @ {c['image_size']}, "
             f"batch {c['batch']} ({r['dtype']}) on {r['device']}",
             f"  {'part':32s} {'JAX s':>10s} {'PyTorch s':>10s} {'ratio':>7s}"]
    for name, row in r["parts"].items():
        j = row["jax"]["median_s"] if row["jax"] else None
        t = row["torch"]["median_s"] if row["torch"] else None
        ratio = f"{t / j:6.2f}x" if j and t else "      -"
        js = f"{j:10.3f}" if j is not None else " " * 9 + "-"
        ts = f"{t:10.3f}" if t is not None else " " * 9 + "-"
        lines.append(f"  {name:32s} {js} {ts} {ratio}")
    return "\n".join(lines)
