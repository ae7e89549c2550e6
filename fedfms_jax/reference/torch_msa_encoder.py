"""PyTorch reference: SAM's ViT image encoder with Medical SAM Adapter blocks.

Architecture of `segment_anything.modeling.ImageEncoderViT` (rel-pos, window 14,
global blocks per variant, eps 1e-6, neck) with each block replaced by the MSA
adapter block of the Medical-SAM-Adapter / FedFMS originals:

- windows are partitioned (zero-padded) *before* norm1 (`pad_before_norm1=True`,
  the originals' order; False gives official SAM's order: norm1, then pad);
- Space_Adapter (with skip) on the attention output, before the window unpartition;
- x = x + mlp(norm2(x)) + 0.5 * MLP_Adapter(norm2(x));
- with `depth_chunk`, the 3-D branch: consecutive groups of `depth_chunk` entries of
  the (window-partitioned) batch are attended along depth by the block's own attention,
  laid out as a closest_numbers(depth) grid, passed through Depth_Adapter and added.

Input NCHW float, output NCHW like the official encoder. Used only by tests and the
benchmark (needs the torch extra).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedfms_jax.reference.vit_table import TORCH_VIT_SIZES, closest_numbers


class TorchAdapter(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 0.25, skip_connect: bool = True):
        super().__init__()
        self.skip_connect = skip_connect
        self.D_fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.D_fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        y = self.D_fc2(F.gelu(self.D_fc1(x)))
        return x + y if self.skip_connect else y


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):  # NCHW
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def rel_pos_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Official get_rel_pos: linear resize of the table if needed, then gather."""
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.t()[None], size=max_rel_dist, mode="linear")
        rel_pos = resized[0].t()
    q_c = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_c = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    idx = (q_c - k_c) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[idx.long()]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x):  # [B, H, W, C]
        B, H, W, C = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, nh, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * nh, H * W, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rh = rel_pos_table(H, H, self.rel_pos_h)
        rw = rel_pos_table(W, W, self.rel_pos_w)
        rq = q.reshape(B * nh, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
        attn = attn.view(B * nh, H, W, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
        attn = attn.view(B * nh, H * W, H * W).softmax(dim=-1)
        out = (attn @ v).view(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(out)


def window_partition(x, ws: int):
    B, H, W, C = x.shape
    ph, pw = (ws - H % ws) % ws, (ws - W % ws) % ws
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, C), (Hp, Wp)


def window_unpartition(w, ws: int, hw_padded, hw):
    Hp, Wp = hw_padded
    B = w.shape[0] // (Hp * Wp // ws // ws)
    x = w.view(B, Hp // ws, Wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, -1)[:, : hw[0], : hw[1]].contiguous()


class MSABlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, window_size, input_size, pad_before_norm1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        size = input_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, size)
        self.MLP_Adapter = TorchAdapter(dim, skip_connect=False)
        self.Space_Adapter = TorchAdapter(dim)
        self.Depth_Adapter = TorchAdapter(dim, skip_connect=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.pad_before_norm1 = pad_before_norm1
        self.scale = 0.5

    def forward(self, x, depth_chunk=None):
        shortcut = x
        if not self.pad_before_norm1:
            x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        if self.pad_before_norm1:
            x = self.norm1(x)
        if depth_chunk:
            # '(b d) h w c -> (b h w) d c', then a (dh, dw) grid along depth.
            n, hh, ww, c = x.shape
            d = depth_chunk
            xd = x.reshape(n // d, d, hh * ww, c).permute(0, 2, 1, 3)
            dh, dw = closest_numbers(d)
            xd = self.Depth_Adapter(self.attn(xd.reshape(-1, dh, dw, c)))
            # '(b n) dh dw c -> (b dh dw) n c' -> 'b (hh ww) c -> b hh ww c'
            xd = xd.reshape(n // d, hh * ww, d, c).permute(0, 2, 1, 3).reshape(n, hh, ww, c)
        x = self.Space_Adapter(self.attn(x))
        if depth_chunk:
            x = x + xd
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.scale * self.MLP_Adapter(xn)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class TorchMSAImageEncoder(nn.Module):
    def __init__(self, variant: str, img_size: int, pad_before_norm1: bool = True):
        super().__init__()
        cfg = TORCH_VIT_SIZES[variant]
        grid = img_size // cfg.patch_size
        D = cfg.embed_dim
        self.img_size = img_size
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, D))
        self.blocks = nn.ModuleList(
            MSABlock(
                D,
                cfg.num_heads,
                cfg.mlp_ratio,
                0 if i in cfg.global_attn_indexes else cfg.window_size,
                (grid, grid),
                pad_before_norm1,
            )
            for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(D, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x, depth_chunk=None):  # NCHW -> NCHW
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, depth_chunk)
        return self.neck(x.permute(0, 3, 1, 2))


def build_torch_msa_encoder(
    variant: str, img_size: int, *, pad_before_norm1: bool = True
) -> torch.nn.Module:
    """MSA-adapted SAM ViT encoder (`variant` in TORCH_VIT_SIZES), eval mode, random init
    (torch defaults: rel_pos and pos_embed zero). forward(x_nchw, depth_chunk=None)."""
    assert img_size % TORCH_VIT_SIZES[variant].patch_size == 0, img_size
    return TorchMSAImageEncoder(variant, img_size, pad_before_norm1).eval()
