"""The federated engine: one jitted, donated call per round over a client-sharded mesh.

State layout (DiLoCo-like): the global trainable tree and the server optimizer state once;
per-client optimizer state (and, when kept, parameters) stacked on a leading clients
axis sharded over the 'clients' mesh axis; the frozen parameters and non-parameter variables
(buffers) held once, replicated, and broadcast into the vmapped local update
(in_axes=None), never copied per client and never given optimizer state.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from fedfms_jax import losses
from fedfms_jax.federated import aggregate, mesh as mesh_lib
from fedfms_jax.federated.client import make_local_update
from fedfms_jax.federated.mesh import CLIENTS
from fedfms_jax.federated.partition import Partition, make_partition
from fedfms_jax.federated.server_optim import ServerOptimizer, server_optimizer as make_server_opt
from fedfms_jax.federated.server_step import server_step

BATCH_KEYS = ("image", "mask", "valid")
PER_CLIENT_METRICS = ("loss", "finite", "active", "counted", "steps", "weight", "touched")


def sam_forward(model, images_uint8):
    """Default forward for fedfms_jax.models.sam.Sam: normalise as the model's config says,
    no prompts (prompt-free models ignore them anyway), single-mask low-res logits."""
    from fedfms_jax.models.sam import preprocess

    logits, _ = model(preprocess(images_uint8, model.cfg.pixel_norm))
    return logits


class FedState(NamedTuple):
    global_params: Any  # trainable subtree (nested dict), replicated
    client_params: Any  # [C, ...] each client's params after the last round; () if not kept
    client_opt_state: Any  # [C, ...] optax state of the trainable subtree; () if not kept
    server_opt_state: Any
    round: jax.Array  # int32 scalar, rounds completed


def _per_client_select(ok, a, b):
    def leaf(x, y):
        return jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)

    return jax.tree.map(leaf, a, b)


class FederatedEngine:
    """Vectorised federated training of the trainable subtree of an nnx model.

    model: nnx.Module (concrete, or abstract from nnx.eval_shape for lowering only).
    partition: a Partition, a preset name or a rules list (see partition.make_partition).
    forward(model, images_uint8 [B,H,W,3]) -> logits [B,h,w,K].
    keep_client_opt_state: carry each client's optimizer state across rounds (the
        original); False: a fresh optimizer state every round.
    keep_client_params: keep each client's locally trained params in the state (costs
        clients x trainable bytes between rounds; a federated round never reads them).
    aggregate_clients: False trains every client on its own, without aggregation (the
        "local" baseline): each client goes on from its own params of the last round
        (kept, so this implies keep_client_params); the global params and the server
        optimizer state stay as initialised.
    client_chunk: train at most this many clients of a device at once (lax.map over
        chunks; activation memory scales with the chunk, not the device's client count).
    compute_dtype: the model's compute dtype. When reduced (bf16), the frozen matmul
        kernels are cast to it once per round instead of at every use in every step (the
        same values: each use casts them anyway). The stored frozen tree stays float32.
    """

    def __init__(
        self,
        model: nnx.Module,
        partition: Partition | str | list,
        *,
        forward: Callable = sam_forward,
        client_optimizer: optax.GradientTransformation | None = None,
        server_optimizer: ServerOptimizer | str = "fedavg",
        loss: str | Callable = "bce",
        pos_weight: float = 2.0,
        prox_mu: float = 0.0,
        mesh: jax.sharding.Mesh | None = None,
        keep_client_opt_state: bool = True,
        keep_client_params: bool = False,
        aggregate_clients: bool = True,
        client_chunk: int | None = None,
        compute_dtype=jnp.float32,
    ):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        if not isinstance(partition, Partition):
            partition = make_partition(params, partition)
        self.graphdef = graphdef
        self.partition = partition
        self.forward = forward
        self.client_tx = client_optimizer if client_optimizer is not None else optax.adam(1e-4)
        self.server = make_server_opt(server_optimizer) if isinstance(server_optimizer, str) else server_optimizer
        self.loss = losses.get_loss(loss, pos_weight=pos_weight) if isinstance(loss, str) else loss
        self.prox_mu = float(prox_mu)
        self.keep_client_opt_state = keep_client_opt_state
        self.aggregate_clients = bool(aggregate_clients)
        self.keep_client_params = keep_client_params or not self.aggregate_clients
        if not self.aggregate_clients and self.prox_mu:
            raise ValueError("prox_mu pulls clients towards the global model: it needs aggregate_clients")
        if client_chunk is not None and client_chunk < 1:
            raise ValueError(f"client_chunk must be >= 1, got {client_chunk}")
        self.client_chunk = client_chunk
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.mesh = mesh if mesh is not None else mesh_lib.client_mesh()
        self._repl = mesh_lib.replicated(self.mesh)
        self._by_client = mesh_lib.client_sharded(self.mesh, 0)
        self._batch_sh = mesh_lib.client_sharded(self.mesh, 1)

        trainable, frozen = partition.split(params)
        self.frozen = mesh_lib.tree_to_global(frozen, self._repl)
        self.rest = jax.tree.map(self._place_rest, rest)
        self.initial_trainable = mesh_lib.tree_to_global(trainable, self._repl)
        self.local_update = make_local_update(
            graphdef, partition, forward, self.loss, self.client_tx, self.prox_mu
        )
        self.num_clients: int | None = None
        self.num_padded: int | None = None
        self._round_jit = None

    def _place_rest(self, x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._repl)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.device_put(x, self._repl)
        return mesh_lib.to_global(x, self._repl)

    # ----- shardings --------------------------------------------------------------------
    @property
    def state_sharding(self) -> FedState:
        r, c = self._repl, self._by_client
        return FedState(r, c, c, r, r)

    def _broadcast(self, tree):
        n = self.num_padded
        out = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)
        return jax.lax.with_sharding_constraint(out, self._by_client)

    # ----- init -------------------------------------------------------------------------
    def _init_fn(self, g):
        start = self._broadcast(g)
        os = jax.vmap(self.client_tx.init)(start) if self.keep_client_opt_state else ()
        cp = start if self.keep_client_params else ()
        return FedState(g, cp, os, self.server.tx.init(g), jnp.zeros((), jnp.int32))

    def init(self, num_clients: int) -> FedState:
        """Global = the model's trainable params; every client starts from it. Clients
        are padded up to a multiple of the mesh size (padded ones never take part)."""
        if self._round_jit is not None and self.num_clients == int(num_clients):
            return self._init_state()
        self.num_clients = int(num_clients)
        self.num_padded = mesh_lib.padded_num_clients(self.num_clients, self.mesh)
        self._round_jit = jax.jit(
            self._round_fn,
            in_shardings=(self.state_sharding, self._repl, self._repl, self._batch_sh, self._repl, self._repl),
            out_shardings=(self.state_sharding, self._repl),
            donate_argnums=(0,),
        )
        self._init_jit = jax.jit(self._init_fn, out_shardings=self.state_sharding)
        return self._init_state()

    def _init_state(self) -> FedState:
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.initial_trainable)):
            return jax.eval_shape(self._init_jit, self.initial_trainable)
        return self._init_jit(self.initial_trainable)

    # ----- one round ----------------------------------------------------------------------
    def _round_fn(self, state: FedState, frozen, rest, batches, weights, participating):
        g = state.global_params
        start = self._broadcast(g) if self.aggregate_clients else state.client_params
        if self.keep_client_opt_state:
            os0 = state.client_opt_state
        else:
            os0 = jax.vmap(self.client_tx.init)(start)
        frozen = self._frozen_for_compute(frozen)
        new_tr, new_os, stats = self._sharded_local_update(start, os0, frozen, rest, g, batches)

        finite = aggregate.client_finite(new_tr, stats["loss"])
        active = participating & (weights > 0)
        ok = active & finite
        if self.aggregate_clients:
            updates = jax.tree.map(jnp.subtract, new_tr, start)
            new_g, new_ss, wn = server_step(self.server, g, state.server_opt_state, updates, weights,
                                            participating & finite, self._sharded_weighted_mean)
        else:
            new_g, new_ss = g, state.server_opt_state
            wn, _ = aggregate.effective_weights(weights, participating & finite)
        # A client that did not count this round keeps its pre-round optimizer state.
        client_os = _per_client_select(ok, new_os, os0) if self.keep_client_opt_state else ()
        client_params = _per_client_select(ok, new_tr, start) if self.keep_client_params else ()

        touched = jnp.stack([t for t in self.partition.flatten_trainable(stats["touched"])], axis=1)
        changed = jnp.stack(
            [jnp.any(a != b) for a, b in zip(self.partition.flatten_trainable(new_g),
                                              self.partition.flatten_trainable(g))]
        )
        metrics = {
            "loss": jnp.where(active, stats["loss"], 0.0),
            "finite": (finite | ~active),
            "active": active,
            "counted": ok,
            "steps": jnp.where(active, stats["steps"], 0),
            "weight": wn,
            "touched": (touched & active[:, None]),
            "changed": changed,
            "round": state.round + 1,
        }
        new_state = FedState(new_g, client_params, client_os, new_ss, state.round + 1)
        return new_state, metrics

    def _frozen_for_compute(self, frozen):
        if self.compute_dtype == jnp.float32:
            return frozen

        def cast(path, x):
            is_kernel = getattr(path[-1], "key", None) == "kernel" and x.ndim >= 2
            return x.astype(self.compute_dtype) if is_kernel and x.dtype == jnp.float32 else x

        return jax.tree.map_with_path(cast, frozen)

    def _sharded_local_update(self, start, os0, frozen, rest, anchor, batches):
        # shard_map: each device vmaps over its own clients with the frozen tree broadcast.
        # (Letting the SPMD partitioner split a vmapped conv over clients miscompiles the
        # grouped convolution it turns into.)
        c = P(CLIENTS)
        fn = jax.shard_map(
            self._local_clients,
            mesh=self.mesh,
            in_specs=(c, c, P(), P(), P(), P(None, CLIENTS)),
            out_specs=(c, c, c),
            check_vma=False,
        )
        return fn(start, os0, frozen, rest, anchor, batches)

    def _sharded_weighted_mean(self, stacked, weights):
        """aggregate.weighted_mean over the client-sharded updates: each device sums its
        own clients, then one all-reduce per leaf. (Indexing each client of the sharded
        axis, as the plain mean does, made the partitioner move every client's slice on
        its own: clients x leaves fusions and collectives in the round's program.)"""
        c = P(CLIENTS)
        return jax.shard_map(
            lambda x, w: jax.lax.psum(aggregate.weighted_mean(x, w), CLIENTS),
            mesh=self.mesh, in_specs=(c, c), out_specs=P(), check_vma=False,
        )(stacked, weights)

    def _local_clients(self, start, os0, frozen, rest, anchor, batches):
        """The clients of one device: all vmapped at once, or `client_chunk` at a time
        (lax.map over chunks) to bound activation memory."""
        local = jax.tree.leaves(start)[0].shape[0]
        if local == 1:  # one client per device (e.g. one per GPU): no client axis to map over
            # (vmapping an axis of size 1 would turn the local steps' cond into selects)
            squeeze = lambda t, axis=0: jax.tree.map(lambda x: jnp.squeeze(x, axis), t)  # noqa: E731
            out = self.local_update(squeeze(start), squeeze(os0), frozen, rest, anchor, squeeze(batches, 1))
            return jax.tree.map(lambda x: x[None], out)
        all_at_once = self.client_chunk is None or (self.client_chunk > 1 and self.client_chunk >= local)
        if all_at_once:
            return jax.vmap(self.local_update, in_axes=(0, 0, None, None, None, 1))(
                start, os0, frozen, rest, anchor, batches)
        per_client = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), batches)
        # batch_size=1 would vmap chunks of one client: leading size-1 axes on every
        # parameter cost XLA:CPU its layout choices (transposed gradient reads in Adam).
        chunk = None if self.client_chunk == 1 else self.client_chunk
        return jax.lax.map(
            lambda a: self.local_update(a[0], a[1], frozen, rest, anchor, a[2]),
            (start, os0, per_client), batch_size=chunk)

    def _pad_clients(self, x, axis, fill=0):
        extra = self.num_padded - x.shape[axis]
        if extra == 0:
            return x
        if extra < 0:
            raise ValueError(f"got {x.shape[axis]} clients, engine was initialised for {self.num_clients}")
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, extra)
        return np.pad(np.asarray(x), pad, constant_values=fill)

    def prepare_batches(self, batches):
        """Host dict image/mask/valid [steps, clients, B, ...] -> client-sharded global
        arrays, clients padded (padding rows invalid). Global arrays pass through."""
        out = {}
        for k in BATCH_KEYS:
            x = batches[k]
            if isinstance(x, jax.Array) and x.shape[1] == self.num_padded:
                out[k] = x
                continue
            out[k] = mesh_lib.to_global(self._pad_clients(np.asarray(x), 1), self._batch_sh)
        return out

    def run_round(self, state: FedState, batches, weights, participating_mask=None):
        """One round: local updates on every client (vmapped, sharded), then aggregation.

        batches: {"image": uint8 [T,C,B,H,W,3], "mask": [T,C,B,h,w,K], "valid": bool [T,C,B]}
        weights: [C] aggregation weights (e.g. aggregate.client_weights; unseen = 0).
        participating_mask: [C] bool (default all). `state` is donated.
        Returns (state, metrics); metrics: loss, finite, active, counted, steps, weight [C];
        touched [C, L] (trainable_paths order); changed [L]; round.
        (`compiled_round()` returns them for the padded clients; see `real_clients`.)
        """
        state, metrics = self.compiled_round()(*self.round_inputs(state, batches, weights, participating_mask))
        return state, self.real_clients(metrics)

    def real_clients(self, metrics: dict) -> dict:
        """The compiled round's metrics (padding clients included) -> the real clients'.
        Trimmed here, on the replicated outputs, not in the program: slicing the
        client-sharded axis to an uneven length there doubled the round's compile time
        on a 4-device mesh."""
        n = self.num_clients
        return {k: v[:n] if k in PER_CLIENT_METRICS else v for k, v in metrics.items()}

    def compiled_round(self):
        """The jitted, donated round function (for `.lower(...).compile()` or timing)."""
        if self._round_jit is None:
            raise RuntimeError("call init(num_clients) first")
        return self._round_jit

    def round_inputs(self, state: FedState, batches, weights, participating_mask=None) -> tuple:
        """The arguments of `compiled_round()`, placed on the mesh, clients padded."""
        w = np.asarray(weights, np.float32)
        p = np.ones(self.num_clients, bool) if participating_mask is None else np.asarray(participating_mask, bool)
        w = mesh_lib.to_global(self._pad_clients(w, 0), self._repl)
        p = mesh_lib.to_global(self._pad_clients(p, 0, False), self._repl)
        return (state, self.frozen, self.rest, self.prepare_batches(batches), w, p)

    # ----- lowering (memory analysis without real arrays) ------------------------------------
    def lower_round(self, num_clients: int, steps: int, batch_size: int, image_hw, mask_hwc,
                    image_dtype=jnp.uint8, mask_dtype=jnp.uint8):
        abstract = self.init(num_clients)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
        c = self.num_padded
        sds = jax.ShapeDtypeStruct
        batches = {
            "image": sds((steps, c, batch_size, *image_hw, 3), image_dtype),
            "mask": sds((steps, c, batch_size, *mask_hwc), mask_dtype),
            "valid": sds((steps, c, batch_size), jnp.bool_),
        }
        strip = lambda t: jax.tree.map(lambda x: sds(x.shape, x.dtype), t)  # noqa: E731
        return self._round_jit.lower(
            abstract, strip(self.frozen), strip(self.rest), batches,
            sds((c,), jnp.float32), sds((c,), jnp.bool_),
        )

    # ----- evaluation helpers -------------------------------------------------------------
    def global_params(self, state: FedState):
        """Full nnx.State of Params of the global model (trainable from state + frozen)."""
        return self.partition.merge(state.global_params, self.frozen)

    def global_model(self, state: FedState) -> nnx.Module:
        return nnx.merge(self.graphdef, self.global_params(state), self.rest)
