"""How a training run's adapters start (adapter_init) and which window-padding order it
trains with (model.pad_before_norm1)."""
import zlib

import numpy as np
import pytest
import torch
from flax import nnx

from fedfms_jax import model_init, run_config
from fedfms_jax.cli_errors import UsageError
from fedfms_jax.models.adapters import Adapter
from weights_convert import rules

SEED, DRAWS = 7, 2


def tiny_cfg(**fields) -> dict:
    c = run_config.base_config()
    run_config.apply_tiny(c)
    c.seed = SEED
    for key, value in fields.items():
        node, _, leaf = key.rpartition(".")
        (c[node] if node else c)[leaf] = value
    run_config.validate(c)
    return c.to_dict()


def adapter_layers(model) -> dict:
    """{PyTorch weight key: (kernel, bias)} of every adapter Linear, as numpy."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Adapter):
            for name in ("D_fc1", "D_fc2"):
                linear = getattr(node, name)
                out[rules.torch_key((*path, name, "kernel"))] = (
                    np.asarray(linear.kernel.get_value()), np.asarray(linear.bias.get_value()))
    return out


def pooled_variance(arrays) -> float:
    """Mean square of values scaled by their layer's bound 1/sqrt(fan_in) (zero-mean draws)."""
    return float(np.mean(np.concatenate([(a * np.sqrt(fan_in)).ravel() ** 2 for a, fan_in in arrays])))


@pytest.fixture(scope="module")
def torch_mean_model():
    _, model, info = model_init.build_model(tiny_cfg(adapter_init="torch_mean"), adapter_draws=DRAWS)
    return model, info


def test_defaults_are_todays_behaviour():
    c = run_config.base_config()
    assert c.model.pad_before_norm1 is False and c.adapter_init == "lecun"
    scfg = model_init.sam_config(tiny_cfg())
    assert scfg.pad_before_norm1 is False


@pytest.mark.parametrize("fields,message", [
    (dict(adapter_init="xavier"), "adapter_init must be"),
    ({"adapter_init": "torch_mean", "model.adapter_zero_init": True}, "contradict"),
    ({"model.pad_before_norm1": True, "model.encoder": "tiny_vit", "image_size": 256}, "ViT encoders only"),
])
def test_bad_settings_are_usage_errors(fields, message):
    with pytest.raises(UsageError, match=message):
        tiny_cfg(**fields)


def test_torch_mean_is_the_mean_of_per_client_pytorch_draws(torch_mean_model):
    model, info = torch_mean_model
    layers = adapter_layers(model)
    assert info["adapter_draws"] == DRAWS and info["adapter_layers_drawn"] == len(layers) > 0
    # Exactly the mean of each client's draw, every draw PyTorch's nn.Linear default
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) on weight and bias, seeded by (seed, client, key).
    for key, (kernel, bias) in layers.items():
        fan_in, fan_out = kernel.shape
        bound = 1 / np.sqrt(fan_in)
        draws = []
        for client in range(DRAWS):
            rng = np.random.default_rng([SEED, client, zlib.crc32(key.encode())])
            w, b = rng.uniform(-bound, bound, (fan_out, fan_in)), rng.uniform(-bound, bound, fan_out)
            assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
            draws.append((w.T, b))
        np.testing.assert_allclose(kernel, np.mean([d[0] for d in draws], axis=0), rtol=0, atol=1e-7)
        np.testing.assert_allclose(bias, np.mean([d[1] for d in draws], axis=0), rtol=0, atol=1e-7)

    # The same law as real PyTorch: draws of nn.Linear layers of the same shapes, the mean
    # of two of them (variance 1/6 in units of bound^2; one draw: 1/3).
    torch.manual_seed(0)
    ours, theirs_one, theirs_mean = [], [], []
    for kernel, _ in layers.values():
        fan_in, fan_out = kernel.shape
        a, b = (torch.nn.Linear(fan_in, fan_out).weight.detach().numpy() for _ in range(2))
        bias = torch.nn.Linear(fan_in, fan_out).bias.detach().numpy()
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(a).max() <= bound and np.abs(bias).max() <= bound
        ours.append((kernel, fan_in))
        theirs_one.append((a, fan_in))
        theirs_mean.append(((a + b) / 2, fan_in))
    assert pooled_variance(theirs_one) == pytest.approx(1 / 3, rel=0.05)
    assert pooled_variance(theirs_mean) == pytest.approx(1 / 6, rel=0.05)
    assert pooled_variance(ours) == pytest.approx(pooled_variance(theirs_mean), rel=0.07)


def test_one_draw_has_a_single_draws_spread(torch_mean_model):
    model, _ = torch_mean_model
    single = nnx.clone(model)
    model_init.init_adapters_torch_mean(single, draws=1, seed=SEED)
    spread = pooled_variance([(k, k.shape[0]) for k, _ in adapter_layers(single).values()])
    assert spread == pytest.approx(1 / 3, rel=0.07)


def test_lecun_leaves_the_models_own_init(torch_mean_model):
    _, model, info = model_init.build_model(tiny_cfg(), adapter_draws=DRAWS)
    assert "adapter_init" not in info
    mean_layers = adapter_layers(torch_mean_model[0])
    for key, (kernel, bias) in adapter_layers(model).items():
        assert not np.any(bias) and not np.allclose(kernel, mean_layers[key][0])


def _save(model, scfg, path):
    from weights_convert.store import save_weights
    return str(save_weights(path, model, scfg))


def test_converted_checkpoint_keeps_its_adapters_and_padding_order(tmp_path, torch_mean_model):
    # An MSA/FedFMS-style checkpoint: adapters of its own, windows padded before norm1.
    from fedfms_jax.models.sam import build_sam
    scfg = model_init.sam_config(tiny_cfg(**{"model.pad_before_norm1": True}))
    msa = build_sam(scfg, rngs=nnx.Rngs(11))
    msa_dir = _save(msa, scfg, tmp_path / "msa")
    got_cfg, model, info = model_init.build_model(tiny_cfg(init_from=msa_dir, adapter_init="torch_mean"),
                                                  adapter_draws=DRAWS)
    assert got_cfg.pad_before_norm1 is True  # the weights' own order, config left at False
    assert info["adapter_layers_drawn"] == 0
    saved = adapter_layers(msa)
    for key, (kernel, bias) in adapter_layers(model).items():
        assert np.array_equal(kernel, saved[key][0]) and np.array_equal(bias, saved[key][1]), key

    # Official-SAM-style weights (no adapters, padding after norm1): the config's True
    # wins, and the adapters the weights lack start as torch_mean.
    sam_cfg = model_init.sam_config(tiny_cfg(**{"model.adapters": False}))
    sam_dir = _save(build_sam(sam_cfg, rngs=nnx.Rngs(12)), sam_cfg, tmp_path / "sam")
    cfg = tiny_cfg(init_from=sam_dir, adapter_init="torch_mean", **{"model.pad_before_norm1": True})
    got_cfg, model, info = model_init.build_model(cfg, adapter_draws=DRAWS)
    assert got_cfg.pad_before_norm1 is True
    expected = adapter_layers(torch_mean_model[0])
    assert info["adapter_layers_drawn"] == len(expected)
    for key, (kernel, bias) in adapter_layers(model).items():
        assert np.array_equal(kernel, expected[key][0]) and np.array_equal(bias, expected[key][1]), key
    # ... and with the config at False the weights' order (official) is kept.
    got_cfg, _, _ = model_init.build_model(tiny_cfg(init_from=sam_dir), adapter_draws=DRAWS)
    assert got_cfg.pad_before_norm1 is False


def test_a_run_draws_once_per_training_client():
    from fedfms_jax.run_state import build_run
    cfg = tiny_cfg(adapter_init="torch_mean", synthetic_sites=4)  # one of the 4 sites is unseen
    run = build_run(cfg)
    assert len(run.clients) == 3 and run.model_info["adapter_draws"] == 3
