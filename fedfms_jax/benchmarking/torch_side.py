"""The PyTorch half of round mode: the original-style round on the same shapes.

The model is the PyTorch model of the original (official segment_anything parts, MSA
encoder for FedMSA, prompt-free decoder); the loop is
fedfms_jax.reference.torch_original_round. Inputs are divided by 255 as the original's
loader does.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from fedfms_jax.benchmarking.stats import progress, time_repeated
from fedfms_jax.reference.torch_fedfms_decoder import build_torch_fedfms_sam
from fedfms_jax.reference.torch_original_round import OriginalStyleFederation


def torch_device() -> str:
    # Decided by torch alone: this process never starts a JAX backend.
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_matmul_flops(device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of a square matmul under torch: its own ceiling on this machine."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def build_torch_model(cfg):
    """The original's PyTorch model for the config. The official sizes come from
    build_torch_fedfms_sam; smaller test variants (vit_tiny) are assembled from the same
    parts with the decoder's widths scaled to the embedding, as the JAX model does."""
    from fedfms_jax.reference import torch_fedfms_decoder as ref

    msa = cfg.method == "fedmsa"
    if cfg.variant in ref.TORCH_VIT_SETTINGS:
        return build_torch_fedfms_sam(cfg.variant, cfg.image_size, num_classes=cfg.num_classes,
                                      prompt_free=cfg.prompt_free, adapters=msa)
    from segment_anything.modeling import ImageEncoderViT, PromptEncoder, TwoWayTransformer

    from fedfms_jax.reference.torch_msa_encoder import build_torch_msa_encoder
    from fedfms_jax.reference.vit_table import TORCH_VIT_SIZES

    v = TORCH_VIT_SIZES[cfg.variant]
    if msa:
        encoder = build_torch_msa_encoder(cfg.variant, cfg.image_size)
    else:
        encoder = ImageEncoderViT(
            img_size=cfg.image_size, patch_size=v.patch_size, embed_dim=v.embed_dim, depth=v.depth,
            num_heads=v.num_heads, mlp_ratio=v.mlp_ratio, out_chans=v.out_chans, qkv_bias=True,
            norm_layer=__import__("functools").partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=v.window_size, global_attn_indexes=v.global_attn_indexes)
    c, g = v.out_chans, cfg.image_size // v.patch_size
    prompt = PromptEncoder(embed_dim=c, image_embedding_size=(g, g),
                           input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16)
    decoder = ref.FedFMSMaskDecoder(
        prompt_free=cfg.prompt_free, num_classes=cfg.num_classes, num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=c, mlp_dim=8 * c, num_heads=8),
        transformer_dim=c, iou_head_depth=3, iou_head_hidden_dim=c)
    return ref.TorchFedFMSSam(encoder, prompt, decoder)


class TorchRound:
    """Built and ready: `run()` is one blocking round; `results(timing)` the rest."""

    def __init__(self, cfg, batches: dict, weights: np.ndarray):
        self.cfg = cfg
        self.threads = cfg.threads or os.cpu_count()
        torch.set_num_threads(self.threads)
        torch.manual_seed(cfg.seed)
        self.device = torch_device()
        progress(f"PyTorch: building the original's model ({self.threads} threads, {self.device})")
        model = build_torch_model(cfg).to(self.device)
        # [steps, clients, B, H, W, 3] uint8 -> [steps, clients, B, 3, H, W] float / 255.
        img = torch.from_numpy(np.ascontiguousarray(batches["image"].transpose(0, 1, 2, 5, 3, 4)))
        self.images = (img.to(self.device).float() / 255.0).contiguous()
        lab = torch.from_numpy(np.ascontiguousarray(batches["mask"].transpose(0, 1, 2, 5, 3, 4)))
        self.labels = lab.to(self.device).float()
        self.fed = OriginalStyleFederation(model, method=cfg.method, weights=weights.tolist(),
                                           persistent=cfg.persistent_clients)
        if cfg.persistent_clients:
            self.fed.global_model = None  # each client holds its own copy; drop the extra one
        del model
        self.round_timings: list[dict] = []

    def run(self) -> None:
        self.loss = self.fed.run_round(self.images, self.labels)
        self.round_timings.append(dict(self.fed.timings))

    def results(self, timing) -> dict:
        cfg = self.cfg
        imgs_round = cfg.steps * cfg.clients * cfg.batch
        timed = self.round_timings[-len(timing.samples):]
        out = {
            "threads": self.threads,
            "device": self.device,
            "persistent_clients": cfg.persistent_clients,
            "round": timing.as_dict(),
            "images_per_s": imgs_round / timing.median,
            "step_s": timing.median / (cfg.steps * cfg.clients),
            "local_s": statistics.median(t["local_s"] for t in timed),
            "aggregate_s": statistics.median(t["aggregate_s"] for t in timed),
            "trainable_params": self.fed.trainable_elements,
            "loss": self.loss,
        }
        if cfg.eval:
            progress("PyTorch: evaluation forward")
            eval_images = self.images[0].reshape(-1, *self.images.shape[3:])
            ev = time_repeated(lambda: self.fed.evaluate(eval_images), warmup=1,
                               repeats=max(min(cfg.repeats, 3), 1))
            out["eval"] = ev.as_dict()
            out["eval_images_per_s"] = eval_images.shape[0] / ev.median
        if self.device == "cuda":
            out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        return out
