"""Frozen-encoder embeddings computed once, for runs that train no image-encoder leaf.

When the whole image encoder is frozen (e.g. FedMSA without encoder adapters, or the
"decoder" partition) its output for an image never changes during training, and on a
CPU the encoder is most of the cost of a step. With `cache_embeddings=True` every
example's image is replaced by its embedding [h,w,C] (float32) the first time a site's
data is used; the training forward then runs only the prompt encoder and mask decoder.
The result is the same function as running the encoder every step (no augmentation is
applied in training, so the encoder sees identical inputs). The original uint8 image is
kept as "pixels" for the overlays. Embeddings are also stored on disk under the asset
cache, keyed by a hash of the encoder weights and of the images, so a rerun or a resumed
run does not embed again.
"""
from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
from flax import nnx

from fedfms_jax.cli_errors import UsageError


def check_encoder_frozen(partition) -> None:
    trained = [p for p in partition.trainable_paths if p.startswith("image_encoder/")]
    if trained:
        raise UsageError(f"cache_embeddings needs a frozen image encoder, but {len(trained)} encoder "
                         f"leaves are trainable (e.g. {trained[0]}); set model.adapters=false or "
                         "cache_embeddings=false")


class Embedder:
    """Jitted frozen-encoder forward over fixed-size batches."""

    def __init__(self, model, pixel_norm: str, batch_size: int = 4):
        from fedfms_jax.models.sam import preprocess
        graphdef, state = nnx.split(model)
        self.state = state
        self.batch_size = batch_size
        digest = hashlib.sha256(pixel_norm.encode())
        # A reduced-precision encoder gives other embeddings: its own entries. (float32 adds
        # nothing, so the entries earlier runs wrote stay valid.)
        dtype = getattr(getattr(model, "cfg", None), "dtype", "float32")
        if dtype != "float32":
            digest.update(f"dtype={dtype}".encode())
        for leaf in jax.tree.leaves(nnx.state(model.image_encoder)):
            digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        self.weights_key = digest.hexdigest()[:24]

        @jax.jit
        def embed(state, images):
            return nnx.merge(graphdef, state).embed(preprocess(images, pixel_norm))

        self._embed = embed

    def cached(self, images: np.ndarray, label: str = "") -> np.ndarray:
        """Embeddings of `images`, from the disk cache when the same weights saw them before."""
        from fedfms_jax.data.assets import cache_dir
        digest = hashlib.sha256(self.weights_key.encode())
        digest.update(np.ascontiguousarray(images).tobytes())
        path = cache_dir() / "embeddings" / f"{digest.hexdigest()[:32]}.npy"
        if path.exists():
            try:
                emb = np.load(path, allow_pickle=False)
                if emb.shape[0] == len(images):
                    return emb
            except (OSError, ValueError):
                pass
        emb = self(images, label)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, emb)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs time
        return emb

    def __call__(self, images: np.ndarray, label: str = "") -> np.ndarray:
        from tqdm import tqdm
        out = []
        b = self.batch_size
        # The first batch also compiles the encoder: the bar shows the run is not hung.
        with tqdm(total=len(images), desc=f"[embed] {label}", unit="img", disable=not label) as bar:
            for i in range(0, len(images), b):
                chunk = images[i:i + b]
                pad = b - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
                out.append(np.asarray(self._embed(self.state, chunk))[:b - pad])
                bar.update(b - pad)
        return np.concatenate(out).astype(np.float32)


class EmbeddedSource:
    """A source whose "image" is the frozen encoder's embedding (computed on first use)."""

    def __init__(self, source, embedder: Embedder, label: str = ""):
        self.source = source
        self.embedder = embedder
        self.label = label
        self._items = None

    def _load(self):
        if self._items is None:
            exs = [self.source[i] for i in range(len(self.source))]
            emb = self.embedder.cached(np.stack([np.asarray(e["image"]) for e in exs]), self.label) if exs else []
            self._items = [dict(e, pixels=np.asarray(e["image"]), image=emb[i]) for i, e in enumerate(exs)]
        return self._items

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return self._load()[i]


class EmbeddedFederation:
    """A Federation whose train/val/all sources yield embeddings (memoised per site)."""

    def __init__(self, fed, embedder: Embedder):
        self.fed = fed
        self.embedder = embedder
        self._cache: dict = {}
        self.name, self.sites, self.num_classes = fed.name, fed.sites, fed.num_classes

    def _get(self, site, split):
        key = (site if isinstance(site, str) else self.fed.sites[site], split)
        if key not in self._cache:
            src = self.fed.train(site) if split == "train" else self.fed.val(site)
            self._cache[key] = EmbeddedSource(src, self.embedder, f"{key[0]} {split}")
        return self._cache[key]

    def embed_sites(self, sites) -> None:
        """Embed the images of `sites` now (a setup phase with progress), not silently
        inside the first round or evaluation."""
        for site in sites:
            for split in ("train", "val"):
                self._get(site, split)._load()

    def train(self, site):
        return self._get(site, "train")

    def val(self, site):
        return self._get(site, "val")

    def all(self, site):
        from fedfms_jax.data.federations import ConcatSource
        return ConcatSource([self.train(site), self.val(site)])
