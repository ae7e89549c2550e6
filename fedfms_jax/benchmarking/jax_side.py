"""The JAX half of round mode: the federated engine's jitted, donated round, timed.

Figures: compile time of the round, median/spread of round seconds with the next round's
batches put on the device while the current one runs (no host synchronisation inside a
round), aggregation seconds (the engine's weighted mean over the stacked client trees,
jitted alone), evaluation images/s (forward of the global model), XLA's FLOPs of one
local step of one client (loop-free, so XLA's count is exact), peak memory and the
bytes a client sends per round.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedfms_jax.benchmarking import flops as flops_lib
from fedfms_jax.benchmarking.stats import Stopwatch, progress, time_repeated
from fedfms_jax.federated import aggregate, comm
from fedfms_jax.federated.client import make_train_step
from fedfms_jax.federated.round import FederatedEngine


def build_model(cfg, dtype_name: str):
    """(model, forward, SamConfig) for the config: SAM with MSA adapters for fedmsa, plain SAM for fedsam."""
    import dataclasses

    from fedfms_jax.model_init import make_forward
    from fedfms_jax.models import sam

    msa = cfg.method == "fedmsa"
    # As the original trains: images / 255 without SAM's mean/std; the MSA blocks pad
    # windows before norm1 (official SAM, used by FedSAM, normalises first).
    kw = dict(encoder=cfg.variant, image_size=cfg.image_size, adapters=msa,
              prompt_free=cfg.prompt_free, num_classes=cfg.num_classes, dtype=dtype_name,
              pixel_norm="unit", pad_before_norm1=msa)
    fields = {f.name for f in dataclasses.fields(sam.SamConfig)}
    if cfg.remat:
        if "remat" not in fields:
            raise ValueError("this model has no rematerialisation option (SamConfig.remat)")
        kw["remat"] = True
    if cfg.scan_blocks:
        kw["scan_blocks"] = True
    scfg = sam.SamConfig(**kw)
    model = sam.build_sam(scfg, rngs=nnx.Rngs(cfg.seed))
    return model, make_forward(scfg.pixel_norm), scfg


def _peak_memory(compiled) -> tuple[int | None, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        return int(total), "XLA memory analysis of the round (arguments + outputs - aliased + temporaries)"
    except Exception:
        return None, "unavailable"


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_host_memory(compiled) -> None:
    """On CPU, refuse to run a round that would not fit in the memory left on the host
    (a shared machine's OOM killer may pick someone else's process)."""
    if jax.devices()[0].platform != "cpu":
        return
    try:
        m = compiled.memory_analysis()
        # The arguments (state, frozen weights, batches) already sit in memory.
        need = m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    except Exception:
        return
    have = _host_available_bytes()
    if need is not None and have is not None and need > 0.9 * have:
        raise MemoryError(f"the round needs about {need / 2**30:.1f} GiB more (XLA memory analysis) but "
                          f"only {have / 2**30:.1f} GiB are available; use fewer clients or a smaller batch")


def step_flops(engine: FederatedEngine, batches, how: str = "xla") -> tuple[float, str, float]:
    """(FLOPs of one local step of one client, source, matmul FLOPs from the jaxpr)."""
    step = make_train_step(engine.graphdef, engine.partition, engine.forward, engine.loss, engine.client_tx)
    tr = engine.initial_trainable
    args = (tr, engine.client_tx.init(tr), engine.frozen, engine.rest, tr,
            {k: jnp.asarray(v[0, 0]) for k, v in batches.items()})
    matmul = flops_lib.jaxpr_flops(step, *args)
    if how == "xla":
        xla = flops_lib.xla_flops(step, *args)
        if xla:
            return xla, "xla_cost_analysis of one local step", matmul
        return matmul, "jaxpr matmul+conv count (XLA cost analysis unavailable)", matmul
    return matmul, "jaxpr matmul+conv count of one local step", matmul


def resolve_client_chunk(chunk: int) -> int:
    """-1 (auto): one client at a time on a CPU, where the vmapped round measured 0.7x the
    speed of the looped one (BENCHMARKS.md); all clients vmapped on accelerators."""
    if chunk >= 0:
        return chunk
    return 1 if jax.default_backend() == "cpu" else 0


class JaxRound:
    """Built, compiled and ready: `run()` is one blocking round; `results(timing)` the rest."""

    def __init__(self, cfg, dtype_name: str, batches: dict, weights: np.ndarray):
        self.cfg, self.dtype_name, self.host_batches, self.weights = cfg, dtype_name, batches, weights
        progress(f"JAX: building {cfg.method} {cfg.variant} @ {cfg.image_size} ({dtype_name})")
        model, forward, _ = build_model(cfg, dtype_name)
        self.engine = engine = FederatedEngine(
            model, cfg.method, forward=forward,
            client_optimizer=optax.adam(1e-4, b1=0.9, b2=0.999),
            server_optimizer="fedavg", loss="bce", pos_weight=2.0,
            keep_client_opt_state=cfg.persistent_clients, compute_dtype=dtype_name,
            keep_client_params=True,  # the aggregation timing below averages them
            **({"client_chunk": chunk} if (chunk := resolve_client_chunk(cfg.client_chunk)) else {}))
        del model
        progress(f"JAX: counting FLOPs of one local step ({cfg.flops})")
        self.flops_step, self.flops_source, self.matmul_step = step_flops(engine, batches, cfg.flops)
        progress("JAX: compiling the round")
        state = engine.init(cfg.clients)
        args = engine.round_inputs(state, batches, weights)
        with Stopwatch() as sw:
            self.compiled = engine.compiled_round().lower(*args).compile()
        self.compile_s = sw.seconds
        _check_host_memory(self.compiled)
        progress(f"JAX: round compiled in {self.compile_s:.1f} s")
        self.fixed = args[1:3]
        self.w_p = args[4:]
        self.state, self.batches, self.metrics = state, args[3], None

    def run(self) -> None:
        # Dispatch the round, then stage the next round's batches while it runs.
        new_state, metrics = self.compiled(self.state, *self.fixed, self.batches, *self.w_p)
        self.batches = self.engine.prepare_batches(self.host_batches)
        self.state, self.metrics = new_state, metrics
        jax.block_until_ready(new_state)

    def results(self, timing) -> dict:
        cfg, engine, state = self.cfg, self.engine, self.state
        metrics = engine.real_clients(self.metrics)
        peak_bytes, peak_source = _peak_memory(self.compiled)  # after the rounds, before eval
        if not np.all(np.asarray(metrics["finite"])):
            raise FloatingPointError("a client's update was not finite during the benchmark")
        # Aggregation alone: the engine's weighted mean over the stacked client trees.
        wn = jnp.asarray(np.pad(self.weights, (0, engine.num_padded - cfg.clients)), jnp.float32)
        mean = jax.jit(aggregate.weighted_mean)
        agg = time_repeated(lambda: jax.block_until_ready(mean(state.client_params, wn)),
                            warmup=1, repeats=max(cfg.repeats, 3))
        imgs_round = cfg.steps * cfg.clients * cfg.batch
        out = {
            "dtype": self.dtype_name,
            "compile_s": self.compile_s,
            "round": timing.as_dict(),
            "images_per_s": imgs_round / timing.median,
            "step_s": timing.median / (cfg.steps * cfg.clients),
            "aggregate_s": agg.median,
            "flops_per_image": self.flops_step / cfg.batch,
            "flops_source": self.flops_source,
            "matmul_flops_per_image": self.matmul_step / cfg.batch,
            "peak_memory_bytes": peak_bytes,
            "peak_memory_source": peak_source,
            "comm_bytes_per_round": comm.comm_bytes(engine.partition),
            "comm_bytes_nonzero_grad": comm.comm_bytes(engine.partition, True, metrics["touched"][0]),
            "trainable_params": engine.partition.count(True),
            "total_params": engine.partition.count(True) + engine.partition.count(False),
            "loss": float(np.mean(metrics["loss"])),
        }
        if cfg.eval:
            progress("JAX: evaluation forward")
            out.update(_bench_eval(cfg, engine, state, self.host_batches))
        return out


def _bench_eval(cfg, engine: FederatedEngine, state, batches) -> dict:
    """Forward of the global model on clients x batch images (one evaluation batch)."""
    params = engine.global_params(state)
    graphdef, rest, forward = engine.graphdef, engine.rest, engine.forward

    @jax.jit
    def predict(params, images):
        return forward(nnx.merge(graphdef, params, rest), images)

    images = jnp.asarray(batches["image"][0].reshape(-1, *batches["image"].shape[3:]))
    timing = time_repeated(lambda: predict(params, images).block_until_ready(),
                           warmup=1, repeats=max(cfg.repeats, 3))
    return {"eval": timing.as_dict(), "eval_images_per_s": images.shape[0] / timing.median}
