"""EVA-ViT-g/14, the frozen vision tower of LLaMA-VID (BLIP-2's penultimate-layer EVA), written from scratch, and
its loading from LAVIS `eva_vit_g.pth` weights. (The CLIP preprocessing of its input lives in media.py.)"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import check_state, read_tensors

HEAD_DIM = 88  # EVA-g's head width; LAVIS builds num_heads = width // 88
LONG_PREFIX = "model.vision_tower.vision_tower."  # where the released long-video checkpoint keeps the tower


@dataclass
class EVAConfig:
    img_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # blocks that RUN: LAVIS stores 40, BLIP-2 / LLaMA-VID use the penultimate block's output
    heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * 4.3637) = int(6144.09), as LAVIS computes it
    eps: float = 1e-6

    @classmethod
    def tiny(cls):
        return cls(img_size=56, patch_size=14, width=176, depth=2, heads=2, mlp_hidden=768)

    @property
    def grid(self):
        return self.img_size // self.patch_size


class Attention(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        # EVA gives q and v a bias but not k (a k bias would cancel in the softmax anyway)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):  # (B, L, C)
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D)
        y = F.scaled_dot_product_attention(q, k, v)  # scale D^-0.5, as EVA's
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x):
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            # bias and GELU in the matmul's epilogue (cuBLASLt), saving a pass over the widest activation. That
            # GELU is the tanh form, within 1e-3 of the exact one: below half precision's own rounding
            h = torch._addmm_activation(self.fc1.bias, x.flatten(0, -2), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], -1))
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as EVA's


class Block(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    # a module of its own only so that the keys read `patch_embed.proj.*`, as LAVIS stores them
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels):
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, N, C), patches in row-major order


class EVAViT(nn.Module):
    def __init__(self, cfg: EVAConfig):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"EVA image size {cfg.img_size} is not a multiple of the patch size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # no final norm: the output is the last running block's residual stream, as LAVIS returns it

    def forward(self, pixels):  # (B, 3, S, S) -> (B, 1+N, C), cls token first
        S = self.cfg.img_size
        if pixels.shape[1:] != (3, S, S):
            raise ValueError(f"EVA-ViT expects pixels of shape (B, 3, {S}, {S}), got {tuple(pixels.shape)}: "
                             f"preprocess with size={S}")
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    @classmethod
    def from_lavis(cls, path_or_state_dict, img_size=224, dtype=torch.float32, device="cpu"):
        """Load LAVIS `eva_vit_g.pth` (all stored blocks but the last run) or a state dict with the
        LLaMA-VID long checkpoint's `model.vision_tower.vision_tower.*` keys (every stored block runs:
        training saved only the running ones). Other keys of such a state dict are ignored."""
        sd = path_or_state_dict
        if not isinstance(sd, dict):
            path = Path(sd)
            if not path.is_file():
                raise FileNotFoundError(f"EVA-ViT weights not found: {path} (give the path of LAVIS eva_vit_g.pth)")
            sd = read_tensors(path)  # no code runs; a damaged or unsafe file is a one-line ValueError
        if any(k.startswith(LONG_PREFIX) for k in sd):
            sd = {k[len(LONG_PREFIX):]: v for k, v in sd.items() if k.startswith(LONG_PREFIX)}
            drop_last = False
        else:
            drop_last = True

        for key in ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
            if key not in sd:
                raise ValueError(f"not an EVA-ViT state dict: key '{key}' is missing "
                                 f"(expected LAVIS eva_vit_g.pth keys or '{LONG_PREFIX}*')")
        width = sd["pos_embed"].shape[-1]
        if width % HEAD_DIM:
            raise ValueError(f"EVA-ViT state dict: 'pos_embed' width {width} is not a multiple of "
                             f"the head width {HEAD_DIM}")
        n_stored = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        depth = n_stored - 1 if drop_last else n_stored
        if depth < 1:
            raise ValueError(f"EVA-ViT state dict holds {n_stored} block(s): none would run")
        cfg = EVAConfig(img_size=img_size, patch_size=sd["patch_embed.proj.weight"].shape[-1], width=width,
                        depth=depth, heads=width // HEAD_DIM, mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0])
        if drop_last:  # the last stored block is not part of the model (BLIP-2 takes the penultimate layer)
            sd = {k: v for k, v in sd.items() if not k.startswith(f"blocks.{n_stored - 1}.")}

        shape = sd["pos_embed"].shape  # the stored grid may differ from img_size's (it is resized): any square
        n = shape[1] - 1 if len(shape) == 3 else -1
        if len(shape) != 3 or shape[0] != 1 or shape[2] != width or n < 1 or math.isqrt(n) ** 2 != n:
            raise ValueError(f"EVA-ViT state dict: 'pos_embed' has shape {tuple(shape)}, expected (1, 1 + g*g, {width})")
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items() if k != "pos_embed"}
        check_state("EVA-ViT state dict", {k: v for k, v in sd.items() if k != "pos_embed"}, expected)

        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"].float(), cfg.grid)
        sd = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in sd.items()}
        model.load_state_dict(sd, assign=True)
        return model.requires_grad_(False).eval()  # frozen in every stage of LLaMA-VID


def resize_pos_embed(pos_embed, grid):
    """(1, 1+g*g, C) -> (1, 1+grid*grid, C): bicubic, align_corners=False, no antialias, computed in
    float32 on the patch tokens only (cls kept), as LAVIS' interpolate_pos_embed does (16x16 -> 24x24 at 336)."""
    old = math.isqrt(pos_embed.shape[1] - 1)
    if old == grid:
        return pos_embed
    C = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].float().reshape(1, old, old, C).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat((pos_embed[:, :1].float(), patches.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)
