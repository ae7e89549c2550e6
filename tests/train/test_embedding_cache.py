"""Cached frozen-encoder embeddings give the same logits as the full forward."""
import numpy as np
import pytest
from flax import nnx

from fedfms_jax import embedding_cache as ec, model_init
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.federated.partition import make_partition
from fedfms_jax.train import parse_config
from tests.train.conftest import TINY


def _tiny_model(adapters: bool):
    cfg = parse_config([*TINY, f"--config.model.adapters={adapters}", "--config.model.prompt_free=true"])[0]
    return cfg, model_init.build_model(cfg)[1]


def test_decoder_on_cached_embeddings_matches_full_forward():
    cfg, model = _tiny_model(adapters=False)
    rng = np.random.default_rng(0)
    images = (rng.random((3, 64, 64, 3)) * 255).astype(np.uint8)
    source = [{"image": im, "mask": np.zeros((16, 16, 1), np.uint8)} for im in images]
    cached = ec.EmbeddedSource(source, ec.Embedder(model, cfg["model"]["pixel_norm"], batch_size=2))
    assert len(cached) == 3
    np.testing.assert_array_equal(cached[1]["pixels"], images[1])
    full = model_init.make_forward(cfg["model"]["pixel_norm"])(model, images)
    emb = np.stack([cached[i]["image"] for i in range(3)])
    dec = model_init.make_forward(cfg["model"]["pixel_norm"], from_embeddings=True)(model, emb)
    np.testing.assert_allclose(np.asarray(dec), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_cache_key_follows_the_encoder_dtype():
    """A bfloat16 encoder must not be served the float32 embeddings (nor write over them)."""
    cfg, model = _tiny_model(adapters=False)
    bf16 = model_init.build_model(parse_config([*TINY, "--config.model.adapters=false",
                                                "--config.model.prompt_free=true",
                                                "--config.model.dtype=bfloat16"])[0])[1]
    same = model_init.build_model(cfg)[1]
    key = lambda m: ec.Embedder(m, cfg["model"]["pixel_norm"]).weights_key  # noqa: E731
    assert key(model) == key(same) and key(bf16) != key(model)


def test_refused_when_encoder_leaves_train():
    _, model = _tiny_model(adapters=True)
    part = make_partition(nnx.state(model, nnx.Param), "fedmsa")
    with pytest.raises(UsageError, match="frozen image encoder"):
        ec.check_encoder_frozen(part)
    ec.check_encoder_frozen(make_partition(nnx.state(model, nnx.Param), "decoder"))


def test_embed_sites_embeds_everything_up_front_with_progress(tmp_path, monkeypatch, capsys):
    """Setup embeds every image of the named sites, with a progress bar per source; the
    first round and evaluation then embed nothing more (they would run silently)."""
    from fedfms_jax.data.federations import synthetic_federation
    monkeypatch.setenv("FEDFMS_CACHE", str(tmp_path))  # nothing cached from other runs
    cfg, model = _tiny_model(adapters=False)
    fed = synthetic_federation(image_size=64, num_sites=3, images_per_site=4)
    calls = []

    class CountingEmbedder(ec.Embedder):
        def __call__(self, images, label=""):
            calls.append(len(images))
            return super().__call__(images, label)

    embedder = CountingEmbedder(model, cfg["model"]["pixel_norm"], batch_size=2)
    embedded = ec.EmbeddedFederation(fed, embedder)
    embedded.embed_sites(["site0", "site2"])
    expected = [len(fed.train(s)) for s in ("site0", "site2")] + [len(fed.val(s)) for s in ("site0", "site2")]
    assert sorted(calls) == sorted(n for n in expected if n)
    err = capsys.readouterr().err
    assert "[embed] site0 train" in err and "[embed] site2 val" in err and "site1" not in err
    n_calls = len(calls)
    for s in ("site0", "site2"):
        embedded.train(s)[0], embedded.all(s)[0]
    assert len(calls) == n_calls  # nothing embedded after setup
