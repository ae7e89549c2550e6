"""One round of the JAX engine under the original FedFMS settings equals the original's
PyTorch training loop on the same data, the same initial weights and the same batches.

Settings (the "fedfms" protocol): FedMSA pads windows before norm1, adapters start as the
mean of per-client PyTorch draws, Adam 1e-4 (0.9, 0.999), BCEWithLogits(pos_weight=2),
images / 255, the prompt-free decoder, FedAvg weighted by samples. The PyTorch side is
fedfms_jax.reference (one model and one Adam per client, clients one after another, the
weighted sum of the clients' parameters taken one parameter at a time), which imports
nothing from the JAX side.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedfms_jax import model_init, run_config
from fedfms_jax.federated import aggregate
from weights_convert.torch_state import export_state_dict, load_state_dict
from fedfms_jax.reference.torch_fedfms_decoder import build_torch_fedfms_sam, randomize_
from fedfms_jax.reference.torch_original_round import OriginalStyleFederation
from fedfms_jax.run_state import make_engine

# vit_tiny at 80 px: a 5x5 token grid padded to 8x8 for windows of 4, so the padding
# order changes the function.
IMAGE_SIZE = 80
SIZES = (3, 5)  # training samples per client: FedAvg weights 3/8 and 5/8
STEPS, BATCH = 2, 2
LR = 1e-4
# An Adam step moves every entry with a gradient by about LR; round-off moves none this far.
MOVED = 1e-6


def fedfms_config(method: str) -> dict:
    c = run_config.base_config()
    run_config.apply_tiny(c)
    c.image_size = IMAGE_SIZE
    c.method = method
    c.model.adapters = method == "fedmsa"
    c.model.pad_before_norm1 = method == "fedmsa"
    c.adapter_init = "torch_mean"
    c.model.prompt_free = True
    c.model.pixel_norm = "unit"
    c.lr, c.b1, c.b2, c.weight_decay, c.pos_weight = LR, 0.9, 0.999, 0.0, 2.0
    c.server_optimizer = "fedavg"
    run_config.validate(c)
    return c.to_dict()


def round_batches(seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    shape = (STEPS, len(SIZES), BATCH)
    h = IMAGE_SIZE // 4
    return {
        "image": rng.integers(0, 256, shape + (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "mask": (rng.random(shape + (h, h, 1)) < 0.3).astype(np.uint8),
        "valid": np.ones(shape, bool),
    }


def initial_models(cfg: dict):
    """(JAX model, PyTorch model) holding the same weights: random non-trivial values
    everywhere (the reference's `randomize_`), the adapters as adapter_init made them."""
    msa = cfg["method"] == "fedmsa"
    _, model, info = model_init.build_model(cfg, adapter_draws=len(SIZES))
    assert info.get("adapter_init") == "torch_mean"
    reference = build_torch_fedfms_sam("vit_tiny", IMAGE_SIZE, adapters=msa, prompt_free=True,
                                       pad_before_norm1=msa)
    randomize_(reference, seed=5)
    without_adapters = {k: v.numpy() for k, v in reference.state_dict().items() if "_Adapter." not in k}
    report = load_state_dict(model, without_adapters, strict=False)
    assert not report.unexpected and not report.mismatched
    assert all("_Adapter." in k for k in report.missing) and (bool(report.missing) == msa)
    start = export_state_dict(model)
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in start.items()}, strict=True)
    return model, reference, start


def jax_round(cfg, model, batches, weights) -> dict:
    engine = make_engine(cfg, model)
    state = engine.init(len(SIZES))
    state, metrics = engine.run_round(state, batches, weights)
    assert np.all(np.asarray(metrics["counted"]))
    return export_state_dict(engine.global_model(state))


def torch_round(reference, batches, weights, method) -> dict:
    images = torch.from_numpy(batches["image"].transpose(0, 1, 2, 5, 3, 4).copy()).float() / 255.0
    labels = torch.from_numpy(batches["mask"].transpose(0, 1, 2, 5, 3, 4).copy()).float()
    fed = OriginalStyleFederation(reference, method=method, weights=[float(w) for w in weights], lr=LR)
    fed.run_round(images, labels)
    return {k: v.detach().numpy().astype(np.float64) for k, v in fed.models[0].state_dict().items()}


def zero_gradient_rows(key: str, value: np.ndarray) -> np.ndarray:
    """Entries whose gradient is zero in exact arithmetic: attention key biases (softmax
    is shift-invariant). Both frameworks give them round-off gradients that Adam
    normalises into steps of up to lr, so they are held to a bound, not compared."""
    mask = np.zeros(value.shape, bool)
    if key.endswith("attn.qkv.bias"):
        d = value.shape[0] // 3
        mask[d:2 * d] = True
    elif key.endswith("k_proj.bias"):
        mask[:] = True
    return mask


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedmsa", "fedsam"])
def test_round_equals_original_pytorch_loop(method):
    cfg = fedfms_config(method)
    weights = aggregate.client_weights(SIZES)
    np.testing.assert_allclose(weights, [3 / 8, 5 / 8], rtol=1e-7)
    batches = round_batches()
    model, reference, start = initial_models(cfg)
    got = jax_round(cfg, model, batches, weights)
    want = torch_round(reference, batches, weights, method)
    assert set(got) == set(want)

    moved, err_sq, update_sq = set(), 0.0, 0.0
    for key, ref in want.items():
        init = np.asarray(start[key], np.float64)
        new = np.asarray(got[key], np.float64)
        skip = zero_gradient_rows(key, ref)
        assert np.all(np.abs((new - init)[skip]) <= 2.5 * LR), key
        ref, new, init = ref[~skip], new[~skip], init[~skip]
        err, update = np.linalg.norm(new - ref), np.linalg.norm(ref - init)
        # Per parameter: within 1e-3 of its update, plus one float32 spacing of its values
        # (a value near 1 is stored to 1.2e-7, about 6e-4 of a two-step Adam move of 2e-4).
        assert err <= 1e-3 * update + 2.0**-23 * np.linalg.norm(ref), (key, err, update)
        # Moved, or frozen / without a gradient (unused prompt embeddings, IoU head, ...), in both.
        ref_moved = np.max(np.abs(ref - init), initial=0) > MOVED
        assert ref_moved == (np.max(np.abs(new - init), initial=0) > MOVED), key
        if ref_moved:
            moved.add(key)
            err_sq, update_sq = err_sq + err**2, update_sq + update**2
    # The whole round's update to 1e-4.
    assert (err_sq / update_sq) ** 0.5 <= 1e-4, (err_sq / update_sq) ** 0.5
    encoder_moved = {k for k in moved if k.startswith("image_encoder.")}
    if method == "fedmsa":  # only the Space and MLP adapters (Depth ones see no 2-D gradient)
        assert encoder_moved and all("Space_Adapter" in k or "MLP_Adapter" in k for k in encoder_moved)
    else:
        assert "image_encoder.patch_embed.proj.weight" in encoder_moved
    assert "mask_decoder.output_upscaling.0.weight" in moved


def test_reference_side_imports_no_jax():
    code = ("import sys\n"
            "import fedfms_jax.reference.torch_original_round, fedfms_jax.reference.torch_fedfms_decoder\n"
            "import fedfms_jax.reference.torch_msa_encoder\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax'))\n"
            "print(bad)\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_reference_vit_table_matches_the_jax_models():
    from fedfms_jax.models.image_encoder import VIT_CONFIGS
    from fedfms_jax.reference.vit_table import TORCH_VIT_SIZES

    assert set(TORCH_VIT_SIZES) == set(VIT_CONFIGS)
    for name, size in TORCH_VIT_SIZES.items():
        assert size._asdict() == {f: getattr(VIT_CONFIGS[name], f) for f in size._fields}, name
