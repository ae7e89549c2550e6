"""A tiny nnx model with SAM-like parameter paths, fake client data and a plain
sequential FedAvg reference (one client after another, parameter-by-parameter mean)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedfms_jax import losses
from fedfms_jax.models.adapters import Adapter
from fedfms_jax.models.common import Buffer


class _Attn(nnx.Module):
    def __init__(self, d, rngs):
        # No qkv bias: the key bias has a mathematically zero gradient (softmax shift
        # invariance); Adam would turn its round-off noise into lr-sized steps that differ
        # between any two summation orders.
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        a = jax.nn.softmax(jnp.einsum("bnd,bmd->bnm", q, k) / np.sqrt(q.shape[-1]), axis=-1)
        return self.proj(jnp.einsum("bnm,bmd->bnd", a, v))


class _Block(nnx.Module):
    def __init__(self, d, rngs):
        self.attn = _Attn(d, rngs)
        self.Space_Adapter = Adapter(d, skip_connect=True, rngs=rngs)
        self.MLP_Adapter = Adapter(d, skip_connect=False, rngs=rngs)
        self.Depth_Adapter = Adapter(d, skip_connect=False, rngs=rngs)  # unused on 2-D data
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.Space_Adapter(self.attn(x))
        h = self.norm(x)
        return x + jnp.tanh(self.mlp(h)) + 0.5 * self.MLP_Adapter(h)


class _Encoder(nnx.Module):
    def __init__(self, d, depth, rngs):
        self.patch_embed = nnx.Conv(3, d, (4, 4), strides=(4, 4), rngs=rngs)
        self.blocks = nnx.List([_Block(d, rngs) for _ in range(depth)])

    def __call__(self, x):
        x = self.patch_embed(x)
        b, h, w, d = x.shape
        t = x.reshape(b, h * w, d)
        for blk in self.blocks:
            t = blk(t)
        return t.reshape(b, h, w, d)


class _Prompt(nnx.Module):
    def __init__(self, d, rngs):
        self.no_mask_embed = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d,)))
        self.pe_gaussian = Buffer(jax.random.normal(rngs.params(), (2, d)))


class _Decoder(nnx.Module):
    def __init__(self, d, k, rngs):
        self.hidden = nnx.Conv(d, d, (3, 3), rngs=rngs)
        self.out = nnx.Conv(d, k, (1, 1), rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.hidden(x)))


class TinySam(nnx.Module):
    def __init__(self, d=8, depth=1, num_classes=1, *, rngs):
        self.image_encoder = _Encoder(d, depth, rngs)
        self.prompt_encoder = _Prompt(d, rngs)
        self.mask_decoder = _Decoder(d, num_classes, rngs)

    def __call__(self, images):
        f = self.image_encoder(images)
        f = f + self.prompt_encoder.no_mask_embed[...] + 0.0 * self.prompt_encoder.pe_gaussian[0, 0]
        return self.mask_decoder(f)


def make_tiny_sam(seed=0, **kw) -> TinySam:
    """Built inside one jit: eager init would compile every initializer per shape."""
    return nnx.jit(lambda: TinySam(rngs=nnx.Rngs(seed), **kw))()


def tiny_forward(model, images_uint8):
    return model(images_uint8.astype(jnp.float32) / 255.0)


def make_client_data(sizes, hw=16, k=1, seed=0):
    """Per client: (images uint8 [n,hw,hw,3], masks uint8 [n,hw/4,hw/4,k])."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        img = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
        m = (rng.random((n, hw // 4, hw // 4, k)) < 0.3).astype(np.uint8)
        out.append((img, m))
    return out


def client_batches(data, batch_size, steps=None):
    """One epoch of in-order batches (the last one smaller), or `steps` batches cycling."""
    img, m = data
    n = len(img)
    epoch = [(img[i:i + batch_size], m[i:i + batch_size]) for i in range(0, n, batch_size)]
    if steps is None:
        return epoch
    return [epoch[s % len(epoch)] for s in range(steps)]


def pack(per_client_batches, batch_size):
    """list (clients) of list (steps) of (img, mask) -> engine batches [T, C, B, ...]."""
    c = len(per_client_batches)
    t = max(len(b) for b in per_client_batches)
    img0, m0 = per_client_batches[0][0]
    image = np.zeros((t, c, batch_size) + img0.shape[1:], np.uint8)
    mask = np.zeros((t, c, batch_size) + m0.shape[1:], np.uint8)
    valid = np.zeros((t, c, batch_size), bool)
    for ci, batches in enumerate(per_client_batches):
        for s, (i, m) in enumerate(batches):
            image[s, ci, :len(i)] = i
            mask[s, ci, :len(m)] = m
            valid[s, ci, :len(i)] = True
    return {"image": image, "mask": mask, "valid": valid}


def path_str(path):
    return "/".join(str(p) for p in path)


_STEPS = {}


def _reference_step(graphdef, trainable_paths, opt, pos_weight, forward):
    """One jitted plain Adam step per (model structure, trainable set): compiled once per
    test session and batch shape."""
    key = (graphdef, trainable_paths, opt, pos_weight, forward)
    if key not in _STEPS:
        tx = make_tx(opt)

        @jax.jit
        def step(tr, opt, other, img, m):
            def loss_fn(tr):
                mdl = nnx.merge(graphdef, tr, other)
                return losses.bce_with_logits(forward(mdl, img), m, pos_weight=pos_weight)

            g = jax.grad(loss_fn)(tr)
            u, opt = tx.update(g, opt, tr)
            return optax.apply_updates(tr, u), opt

        _STEPS[key] = step
    return _STEPS[key]


def make_tx(opt):
    name, lr = opt
    return optax.adam(lr) if name == "adam" else optax.sgd(lr, momentum=0.9)


def sequential_fedavg(model, trainable_paths, per_round_batches, weights, rounds, *, lr=1e-3,
                      pos_weight=2.0, keep_opt_state=True, opt=None, forward=None):
    """Reference: for each round, each client (in turn) trains a copy of the global model on
    its own (unpadded) batches with its own Adam, then the server averages parameter by
    parameter in float64. Returns the final global trainable params {path: np.ndarray}."""
    trainable_paths = frozenset(trainable_paths)
    is_tr = lambda path, v: isinstance(v, nnx.Param) and path_str(path) in trainable_paths  # noqa: E731
    graphdef, glob, other = nnx.split(model, is_tr, ...)
    opt = opt or ("adam", lr)
    tx = make_tx(opt)
    step = _reference_step(graphdef, trainable_paths, opt, pos_weight, forward or tiny_forward)

    n = len(weights)
    init_opt = jax.jit(tx.init)  # one program, not one per leaf shape
    opts = [init_opt(glob) for _ in range(n)]
    w = np.asarray(weights, np.float64)
    for r in range(rounds):
        results = []
        for c in range(n):
            if w[c] == 0:
                results.append(None)
                continue
            tr = glob
            opt = opts[c] if keep_opt_state else init_opt(glob)
            for img, m in per_round_batches[r][c]:
                tr, opt = step(tr, opt, other, jnp.asarray(img), jnp.asarray(m))
            opts[c] = opt
            results.append(tr)
        leaves = [jax.tree.leaves(t) if t is not None else None for t in results]
        ws = w / w.sum()
        new = []
        for li, ref in enumerate(jax.tree.leaves(glob)):
            acc = np.zeros(ref.shape, np.float64)
            for c in range(n):
                if leaves[c] is not None:
                    acc += ws[c] * np.asarray(leaves[c][li], np.float64)
            new.append(jnp.asarray(acc.astype(np.float32)))  # host cast: no program per shape
        glob = jax.tree.unflatten(jax.tree.structure(glob), new)
    kl, _ = jax.tree_util.tree_flatten_with_path(glob)
    from fedfms_jax.federated.partition import path_to_str
    return {path_to_str(k): np.asarray(v) for k, v in kl}
