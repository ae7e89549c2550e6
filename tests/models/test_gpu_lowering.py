"""The federated round of the gpu plan, lowered for CUDA from this CPU machine.

FedMSA and FedSAM rounds of ViT-B at 1024 in bf16, clients sharded over the suite's 4 fake
devices, exported with `jax.export` for the "cuda" platform from abstract weights (nothing
is allocated, nothing compiled). cuDNN itself refuses to lower without a GPU, so its
constraints on the attention calls are checked statically; benchmarks/gpu.sh proves the
fused kernel on a GPU.
"""
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from fedfms_jax.federated import mesh as mesh_lib
from fedfms_jax.federated.round import FederatedEngine
from fedfms_jax.models import fused_attention as fa
from fedfms_jax.models import rel_pos_attention as rpa
from fedfms_jax.models.sam import SamConfig, build_sam

CLIENTS, BATCH, STEPS, SIZE = 6, 4, 1, 1024
HEADS, HEAD_DIM = 12, 64
# ViT-B at 1024: 4 global blocks (one call each) and 8 windowed blocks whose 64x64 grid
# makes 4 bands of windows (whole windows and the 8-token edge, per axis).
CALLS_PER_FORWARD = 4 + 8 * 4


def host_calls(module_text: str) -> list[str]:
    """Custom-call targets that call back into the host (Python callbacks)."""
    targets = re.findall(r'custom_call @([\w.$]+)|custom_call_target\s*=\s*"([^"]+)"', module_text)
    return [t for pair in targets for t in pair if "callback" in t.lower()]


def _sharded_structs(engine, num_clients):
    """The round's arguments as ShapeDtypeStructs with the engine's shardings."""
    state = engine.init(num_clients)  # abstract: the model's weights are ShapeDtypeStructs
    c = engine.num_padded
    sds = jax.ShapeDtypeStruct
    repl = mesh_lib.replicated(engine.mesh)
    state = type(state)(*[jax.tree.map(lambda x, s=s: sds(x.shape, x.dtype, sharding=s), part)
                          for part, s in zip(state, engine.state_sharding)])
    batch_sh = mesh_lib.client_sharded(engine.mesh, 1)
    batches = {
        "image": sds((STEPS, c, BATCH, SIZE, SIZE, 3), jnp.uint8, sharding=batch_sh),
        "mask": sds((STEPS, c, BATCH, SIZE // 4, SIZE // 4, 1), jnp.uint8, sharding=batch_sh),
        "valid": sds((STEPS, c, BATCH), jnp.bool_, sharding=batch_sh),
    }
    strip = lambda t: jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=repl), t)  # noqa: E731
    return (state, strip(engine.frozen), strip(engine.rest), batches,
            sds((c,), jnp.float32, sharding=repl), sds((c,), jnp.bool_, sharding=repl))


def _export_round(method: str, devices):
    cfg = SamConfig(encoder="vit_b", image_size=SIZE, adapters=method == "fedmsa", prompt_free=True,
                    pixel_norm="unit", dtype="bfloat16", kernels="gpu")
    model = nnx.eval_shape(lambda: build_sam(cfg, rngs=nnx.Rngs(0)))
    engine = FederatedEngine(model, method, client_optimizer=optax.adam(1e-4), compute_dtype="bfloat16",
                             mesh=mesh_lib.client_mesh(devices))
    structs = _sharded_structs(engine, CLIENTS)
    calls = []
    real = jax.nn.dot_product_attention

    def record(q, k, v, bias=None, **kw):
        calls.append(dict(q=(q.shape, q.dtype), k=(k.shape, k.dtype), v=(v.shape, v.dtype), bias=bias,
                          mask=kw.get("mask"), impl=kw.get("implementation")))
        return real(q, k, v, bias=bias, **kw)

    def einsum_layout(*_, **__):
        raise AssertionError("the gpu plan took an einsum (cpu/reference) attention layout")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax.nn, "dot_product_attention", record)
        mp.setattr(rpa, "rel_pos_attention", einsum_layout)
        exported = jax.export.export(engine.compiled_round(), platforms=("cuda",))(*structs)
    return engine, model, exported, calls


@pytest.fixture(scope="module", params=["fedmsa", "fedsam"])
def lowered(request, four_devices):
    return (request.param, *_export_round(request.param, four_devices))


def test_round_lowers_for_cuda_without_cpu_paths(lowered):
    method, engine, model, exported, calls = lowered
    assert exported.platforms == ("cuda",)
    assert exported.nr_devices == 4
    text = exported.mlir_module()
    assert not host_calls(text)  # no fusion barrier, no Python callback of any kind
    plan = model.kernels
    assert plan.name == "gpu" and not plan.mixed_matmul
    assert not plan.barrier_between_blocks(len(model.image_encoder.blocks))
    assert engine.client_chunk is None  # every client of a device at once
    assert calls and len(calls) % CALLS_PER_FORWARD == 0, len(calls)


def test_every_encoder_attention_is_in_cudnn_form(lowered):
    method, engine, model, exported, calls = lowered
    dims = set()
    for c in calls:
        (qs, qd), (ks, kd), (vs, vd) = c["q"], c["k"], c["v"]
        assert qd == kd == vd == jnp.bfloat16, c
        assert len(qs) == len(ks) == len(vs) == 4, c  # BTNH: batch, tokens, heads, head dim
        assert qs[2] == ks[2] == vs[2] == HEADS, c
        hd = qs[3]
        assert hd == ks[3] == vs[3] and hd % 8 == 0 and hd <= 256, c
        assert fa.cudnn_accepts(qd, hd)
        assert c["bias"] is None and c["mask"] is None, "an explicit bias/mask tensor"
        dims.add(hd)
    # Global blocks: 64 + 64 + 64 folded; windows: 64 + 14 + 14 -> 96.
    assert dims == {3 * HEAD_DIM, 96}
