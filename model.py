"""The LLaMA-2 / Vicuna decoder written out in plain PyTorch, the LlamaVID model that splices visual tokens
into its prompt, checkpoint loading from the original HF directories, and generation."""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from checkpoint import (TOKEN_PREFIXES, VISION_PREFIX, check_config, checkpoint_dir, find_bert_vocab,
                        find_vision_weights, hf_to_ours, is_hub_id, load_weights, read_config)
from generate import generate
from tokens import VisualTokenizer
from vision import EVAViT

try:  # optional: flash-attn's kernels when installed; SDPA (which has flash kernels of its own) otherwise
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


# ----------------------------------------------------------------------------------------------------------
# config

@dataclass
class LLaMAConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"type": "linear", "factor": f} as config.json writes it
    max_seq_len: int = 4096  # max_position_embeddings; the usable context is this times the linear factor

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def context_length(self) -> int:
        factor = (self.rope_scaling or {}).get("factor", 1.0)
        return int(self.max_seq_len * factor)

    @classmethod
    def from_hf(cls, hf: dict, source="config.json") -> "LLaMAConfig":
        """From a transformers LlamaConfig dict (config.json); source names the file in error messages."""
        check_config(hf, source)

        def need(key):
            if hf.get(key) is None:
                raise ValueError(f"{source} has no {key!r}: not the config.json of a LLaMA checkpoint")
            return hf[key]
        dim, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = hf.get("num_key_value_heads") or heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"{source}: hidden_size {dim}, num_attention_heads {heads} and num_key_value_heads "
                             f"{kv_heads} do not divide evenly; the file is damaged or not a LLaMA config")
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 writes rope settings here
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return cls(vocab_size=need("vocab_size"), dim=dim, n_layers=need("num_hidden_layers"), n_heads=heads,
                   n_kv_heads=kv_heads, hidden_dim=need("intermediate_size"), norm_eps=hf.get("rms_norm_eps", 1e-5),
                   rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0), rope_scaling=scaling,
                   max_seq_len=hf.get("max_position_embeddings", 4096))

    def to_hf(self) -> dict:
        """The config.json fields of a transformers LlamaConfig."""
        return {"vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "intermediate_size": self.hidden_dim, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_seq_len}

    @classmethod
    def tiny(cls, **kw) -> "LLaMAConfig":
        return cls(**{**dict(vocab_size=600, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=172), **kw})


VICUNA_7B = LLaMAConfig()
VICUNA_13B = LLaMAConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824)


def image_size_from_config(cfg: dict) -> int:
    """The preprocessing size S of a LLaMA-VID config.json: the number ending its `image_processor`
    ("./llamavid/processor/clip-patch14-336" -> 336). Absent, the original falls back to OpenAI
    clip-vit-large-patch14, which is 224."""
    name = cfg.get("image_processor")
    if name is None:
        return 224
    m = re.search(r"-(\d+)$", str(name).rstrip("/"))
    if not m:
        raise ValueError(f"cannot tell the image size from image_processor '{name}' in config.json: "
                         f"it should end in -224 or -336")
    return int(m.group(1))


# what the original's training writes into every config.json besides the shapes (a model built here gets them)
ORIGINAL_CONFIG = {
    "architectures": ["LlavaLlamaAttForCausalLM"], "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "hidden_act": "silu", "tie_word_embeddings": False, "use_cache": True,
    "mm_vision_select_layer": -2, "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
    "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
}


@dataclass
class LlamaVIDConfig:
    """The composite model's settings: what the original's config.json says, read by name. The LLM's shapes are
    here; EVA's and the Q-Former's come with their weights, since no config.json gives them. Every other field of
    the file is kept in `extra` and written back as it was."""
    llm: LLaMAConfig = field(default_factory=LLaMAConfig)
    mm_hidden_size: int = 1408                # EVA's width: the visual features'
    image_size: int = 224                     # preprocessing size (image_processor ".../clip-patch14-224")
    patch_size: int = 14                      # EVA-g/14, as every released model
    image_aspect_ratio: str = "pad"           # "pad": images go on a square of the mean colour first
    video_token: int = 2                      # placeholders a frame in the long-video prompt
    compress_type: Optional[str] = "mean"     # content tokens: "mean", "grid:g" or None (every patch)
    bert_type: str = "qformer_pretrain"
    num_query: int = 32
    select_feature: str = "patch"             # mm_vision_select_feature
    projector_type: str = "mlp2x_gelu"        # mm_projector_type
    qformer_num_heads: Optional[int] = None   # no original config.json has it (bert-base-uncased's config does)
    vision_tower: str = "./model_zoo/LAVIS/eva_vit_g.pth"  # mm_vision_tower, relative to the working directory
    max_length: Optional[int] = None          # model_max_length of training
    extra: dict = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict, source="config.json") -> "LlamaVIDConfig":
        check_config(hf, source)
        if hf.get("mm_hidden_size") is None:
            raise ValueError(f"{source} has no 'mm_hidden_size': this is not a LLaMA-VID checkpoint")
        d = cls()
        return cls(llm=LLaMAConfig.from_hf(hf, source), mm_hidden_size=hf["mm_hidden_size"],
                   image_size=image_size_from_config(hf),
                   image_aspect_ratio=hf.get("image_aspect_ratio", d.image_aspect_ratio),
                   video_token=hf.get("video_token", d.video_token), compress_type=hf.get("compress_type"),
                   bert_type=hf.get("bert_type", d.bert_type), num_query=hf.get("num_query", d.num_query),
                   select_feature=hf.get("mm_vision_select_feature", d.select_feature),
                   projector_type=hf.get("mm_projector_type", d.projector_type),
                   qformer_num_heads=hf.get("qformer_num_heads"), vision_tower=hf.get("mm_vision_tower", ""),
                   max_length=hf.get("model_max_length"), extra=dict(hf))

    def to_hf(self) -> dict:
        """config.json as the original writes it: the fields read above with their current values, every other
        field as it was read (a model built here gets the original's constant fields)."""
        out = {**ORIGINAL_CONFIG, **self.extra, **self.llm.to_hf()}
        out.update(mm_hidden_size=self.mm_hidden_size, image_aspect_ratio=self.image_aspect_ratio,
                   video_token=self.video_token, compress_type=self.compress_type, bert_type=self.bert_type,
                   num_query=self.num_query, mm_vision_select_feature=self.select_feature,
                   mm_projector_type=self.projector_type, mm_vision_tower=self.vision_tower)
        if "image_processor" not in out or image_size_from_config(out) != self.image_size:
            out["image_processor"] = f"./llamavid/processor/clip-patch14-{self.image_size}"
        for key, value in (("qformer_num_heads", self.qformer_num_heads), ("model_max_length", self.max_length)):
            if value is not None:
                out[key] = value
        return out

# ----------------------------------------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 and cast back before the gain, as the HF LLaMA does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_positions(positions: torch.Tensor, rope_scaling: Optional[dict]) -> torch.Tensor:
    """Map token positions to the positions RoPE sees. Other scaling types go here."""
    positions = positions.float()
    if not rope_scaling:
        return positions
    kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if kind == "linear":  # position interpolation: a long context squeezed into the trained range
        return positions / float(rope_scaling["factor"])
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: 'linear')")


def rope_cos_sin(positions, inv_freq, rope_scaling):
    """cos and sin, (B, T, head_dim), in the rotate-half layout of HF LLaMA (frequencies repeated twice)."""
    freqs = rope_positions(positions, rope_scaling)[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, T, D)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(q, k, v, mask: Optional[torch.Tensor] = None, causal: bool = False):
    """The one attention function: (B, H, Tq, D) x (B, H, Tk, D) -> (B, H, Tq, D).
    mask is boolean (True = may attend), broadcastable to (B, H, Tq, Tk)."""
    if q.shape[2] == 1 and mask is not None and k.shape[2] <= 4096:
        # one query over a short cache (a decode step): plain ops, which the compiled step fuses with their
        # neighbours, where an attention kernel launch a layer costs more than its work (long caches keep SDPA)
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v
    if flash_attn_func is not None and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn aligns a causal mask to the bottom right, which is what a chunk after a cache needs
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    if causal and mask is None and q.shape[2] != k.shape[2]:
        # a prefill chunk after cached tokens: the causal mask aligned to the bottom right, which SDPA's flash and
        # memory-efficient kernels apply themselves (no (Tq, Tk) mask in memory, and flash stays usable)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


class KVCache(nn.Module):
    """A static, preallocated cache: keys and values are written at slot indices, so shapes never change."""

    def __init__(self, batch_size, n_heads, max_len, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """input_pos: the slots, a tensor (decoding), or a slice for a prefill chunk of consecutive slots: a plain
        copy, several times faster than index_copy_ at thousands of tokens."""
        if isinstance(input_pos, slice):
            self.k[:, :, input_pos] = k
            self.v[:, :, input_pos] = v
        else:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.wqkv = None  # set by LLaMA.fuse() for inference: wq, wk, wv stacked into one matmul
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        B, T, _ = x.shape
        if self.wqkv is not None:
            kv_dim = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            if kv_len is not None:  # a prefill chunk reads only the filled slots
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = attention(q, k, v, mask=mask, causal=mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w13 = None  # set by LLaMA.fuse() for inference: w1 and w3 stacked into one matmul

    def forward(self, x):
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, input_pos=None, kv_len=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, kv_len)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------------------
# the decoder

class LLaMA(nn.Module):
    def __init__(self, cfg: LLaMAConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.gradient_checkpointing = False
        self.quantized: Optional[str] = None  # "int8" / "int4" once quantize.quantize_model has swapped the Linears

    def _inv_freq(self, device=None):
        d = self.cfg.head_dim
        return 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        """Preallocate a static KV cache of max_len slots in every layer (generation)."""
        p = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                                               dtype or p.dtype, device or p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    @torch.no_grad()
    def fuse(self) -> "LLaMA":
        """For inference, in place: wq/wk/wv become one projection and w1/w3 another. Decoding reads the same
        bytes in 4 matmuls a layer instead of 7 (fewer, larger kernels). Checkpoint names stay those of the separate
        weights, so load (and merge LoRA) before fusing and save from an unfused model; quantise after fusing."""
        def stacked(*linears):
            fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=False, device="meta")
            w = linears[0].weight
            fused.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=w.requires_grad)
            return fused
        for layer in self.layers:
            att, ff = layer.attention, layer.feed_forward
            if att.wqkv is not None:
                continue
            if not all(type(m) is nn.Linear for m in (att.wq, att.wk, att.wv, ff.w1, ff.w3)):
                raise ValueError("fuse() needs plain nn.Linear projections: fuse before quantising or adding LoRA")
            att.wqkv = stacked(att.wq, att.wk, att.wv)
            ff.w13 = stacked(ff.w1, ff.w3)
            del att.wq, att.wk, att.wv, ff.w1, ff.w3  # the stacked copies replace them (no weight held twice)
        return self

    def forward(self, tokens=None, embeds=None, attention_mask=None, positions=None, input_pos=None,
                logits_from: int = 0, block_fn: Optional[Callable] = None):
        """Logits for tokens (B, T) or input embeddings (B, T, dim).

        attention_mask: (B, S) with 1 for real tokens and 0 for padding, over all keys (S = T without a cache,
            the cache length with one). positions: (B, T) RoPE positions, default input_pos or 0..T-1.
        input_pos: (T,) cache slots to write this chunk to; enables the KV cache set up by setup_cache.
        logits_from: compute logits only for positions >= this (prefill needs only the last one).
        block_fn: run each layer as block_fn(layer, x, ...) (generate.py's compiled block, for prefill).
        """
        x = self.tok_embeddings(tokens) if embeds is None else embeds
        B, T, _ = x.shape
        cached = input_pos is not None and self.layers[0].attention.kv_cache is not None
        if positions is None:
            positions = (input_pos if cached else torch.arange(T, device=x.device)).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.cfg.rope_scaling)

        mask, kv_len = None, None  # mask None = plain causal attention, the fast path
        if cached:
            S = self.layers[0].attention.kv_cache.k.shape[2]
            chunk = False
            if T > 1:  # prefill: attend over the slots filled so far (decode keeps the static full length)
                first, last = input_pos[[0, -1]].tolist()
                S = kv_len = last + 1
                chunk = last - first == T - 1  # consecutive slots ending at kv_len: causal, bottom-right aligned
            if (T < S and not chunk) or attention_mask is not None:
                mask = torch.arange(S, device=x.device)[None, :] <= input_pos[:, None]  # (T, S)
            qpos = input_pos
        else:
            S, qpos = T, torch.arange(T, device=x.device)
            if attention_mask is not None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:
            mask = mask[None] & attention_mask[:, None, :S].bool()  # (B, T, S)
            # a query with no visible key (left padding) sees itself, so its row stays finite
            diag = torch.arange(S, device=x.device)[None, None, :] == qpos[None, :, None]
            mask = mask | (diag & ~mask.any(-1, keepdim=True))
            mask = mask[:, None]
        elif mask is not None:
            mask = mask[None, None]
        kv_len = kv_len if cached else None
        input_pos = input_pos if cached else None
        if cached and T > 1 and chunk and block_fn is None:  # (compiled, a slice would be a constant: recompiles)
            input_pos = slice(first, last + 1)  # the cache write of a prefill chunk is a plain copy

        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, input_pos, kv_len,
                                                      use_reentrant=False)
            elif block_fn is not None:
                x = block_fn(layer, x, cos, sin, mask, input_pos, kv_len)
            else:
                x = layer(x, cos, sin, mask, input_pos, kv_len)
        x = self.norm(x[:, logits_from:])
        return self.output(x).float()

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "LLaMA":
        """Load an HF LLaMA / Vicuna checkpoint directory (config.json + .bin / sharded .bin / .safetensors), or
        a Hugging Face Hub id (see checkpoint_dir)."""
        path = checkpoint_dir(path)
        hf = read_config(path)
        with torch.device("meta"):
            model = cls(LLaMAConfig.from_hf(hf, source=path / "config.json"))
        load_weights(model, path, lambda key: hf_to_ours(key), dtype=dtype, device=device)
        model.inv_freq = model._inv_freq(device)
        return model.eval()


# ----------------------------------------------------------------------------------------------------------
# model FLOPs, for MFU: the one definition train.py and bench.py report against

# dense bf16 peaks (no sparsity), matched against torch.cuda.get_device_name() in this order
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
             ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 125e12), ("4090", 165e12)]


def peak_flops(device) -> Optional[float]:
    """The GPU's dense bf16 peak, or None (a CPU, or a GPU not in PEAK_BF16)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_BF16 if key in name), None)


def training_flops(llm: LLaMA, tokens: int, seq_len: int) -> float:
    """Model FLOPs of a training step over `tokens` LLM positions in sequences of seq_len. Per position: 2N
    forward over the N matmul weights (the output head counted, the embedding lookup not); 2N backward for the
    activations' gradients, which the loss sends through every layer whether it trains or not; 2 more per trained
    weight; attention 4 L T d forward (QK^T and AV, the causal half not subtracted), times 3 with its backward.
    EVA, the Q-Former and gradient checkpointing's recomputation are not counted."""
    c = llm.cfg
    n = c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * c.n_kv_heads * c.head_dim + 3 * c.dim * c.hidden_dim)
    n += c.dim * c.vocab_size
    trained = sum(p.numel() for name, p in llm.named_parameters() if p.requires_grad and "tok_embeddings" not in name)
    return tokens * (4 * n + 2 * trained + 12 * c.n_layers * seq_len * c.dim)


# ----------------------------------------------------------------------------------------------------------
# LLaMA-VID: the EVA tower, the visual token generator and the LLM, with visual tokens spliced into the prompt

IGNORE_INDEX = -100        # label value the loss skips
IMAGE_TOKEN_INDEX = -200   # input id standing for the visual tokens of one image / one video
IMAGE_TOKEN = "<image>"    # its placeholder in prompt text
MEDIA_KINDS = ("image", "video", "movie")


@dataclass
class Media:
    """One image, video or movie as the model takes it. What it is is said where it is loaded (media.py), never
    guessed from tensor shapes:
      image, video: pixels (T, 3, S, S), CLIP-normalised (T = 1 for an image), or features (T, 1+N, W), EVA's
        output with its cls token first; every frame becomes a context token and content tokens, all in place of
        one <image> placeholder;
      movie (a long video, for the long-video model): features (T, 1+N, W), cls first; the token generator sees the
        patches only, and the prompt holds `video_token` placeholders a frame. text: what stands in place of
        <image> in the human message (the movie prompt of frames and subtitles)."""
    kind: str
    pixels: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    times: Optional[list] = None  # seconds of each frame from the stream start, when known
    text: Optional[str] = None

    def __post_init__(self):
        if self.kind not in MEDIA_KINDS:
            raise ValueError(f"media kind {self.kind!r} is not one of {', '.join(MEDIA_KINDS)}")
        if self.pixels is None and self.features is None:
            raise ValueError(f"{self.kind} media need pixels or features")
        if self.kind == "movie" and self.features is None:
            raise ValueError("movie media are EVA features (T, 1+N, W): encode the frames first (media.encode_frames)")

    @property
    def frames(self) -> int:
        return len(self.features if self.features is not None else self.pixels)

    def to(self, device=None, dtype=None) -> "Media":
        """A copy with its tensors moved (floating point ones cast to dtype when given)."""
        move = (lambda t: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None))
        return Media(self.kind, move(self.pixels), move(self.features), self.times, self.text)



class LlamaVID(nn.Module):
    def __init__(self, llm: LLaMA, vision: Optional[EVAViT], visual: VisualTokenizer, config: LlamaVIDConfig):
        super().__init__()
        self.llm = llm          # LLaMA
        self.vision = vision    # EVA, or None when only precomputed features are used
        self.visual = visual    # the token generator: Q-Former, context token, content tokens, projectors
        self.config = config

    @property
    def hf_config(self) -> dict:
        """config.json of this model, in the original's form."""
        return self.config.to_hf()

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def video_token(self) -> int:
        return self.config.video_token

    @property
    def mm_hidden_size(self) -> int:
        return self.config.mm_hidden_size

    @property
    def is_long_video(self) -> bool:
        """The hour-long model: rope scaling stretched the context (stage 3)."""
        return bool(self.llm.cfg.rope_scaling)

    @property
    def pads_images(self) -> bool:
        """Images go on a square canvas of the mean colour before preprocessing (image_aspect_ratio "pad")."""
        return self.config.image_aspect_ratio == "pad"

    @property
    def n_patches(self) -> int:
        return self.config.n_patches

    def frame_tokens(self, kind: str = "video") -> int:
        """LLM tokens one frame becomes: a context token and the content tokens, or in a movie video_token (one
        placeholder each in its prompt)."""
        return self.video_token if kind == "movie" else self.visual.tokens_per_frame(self.n_patches)

    def tokens_per_frame(self) -> int:
        return self.frame_tokens("video")

    def media_tokens(self, media: list, prompts: list) -> list:
        """Visual tokens of a batch's media (model.Media or None): entry b is (len(prompts[b]), tokens, dim), one row
        per guiding question, or None where prompts[b] is None. Images and videos go through EVA (when they are
        pixels) and the Q-Former together: a call for each sample would cost a small-model training step most of its
        time in small kernels. A movie, whose Q-Former runs in blocks of frames, has its own call, and it is here,
        and only here, that a movie's cls token is dropped: the original gives the token generator its patches."""
        out, short = [None] * len(prompts), []
        for b, p in enumerate(prompts):
            if p is not None and media[b].kind == "movie":
                out[b] = self.visual(media[b].features[:, 1:], p, long_video=True)
            elif p is not None:
                short.append(b)
        if not short:
            return out
        feats = [m.features for m in self.encode_media([media[b] for b in short])]
        for b, v in zip(short, self.visual.forward_many(feats, [prompts[b] for b in short])):
            out[b] = v
        return out

    def encode_media(self, media: list) -> list:
        """The media with EVA's features in place of pixels, those of every item of the batch in one call (None
        and items already encoded pass through)."""
        todo = [i for i, m in enumerate(media) if m is not None and m.features is None]
        if todo and self.vision is None:
            raise ValueError("this model was loaded without its vision tower; give EVA features instead of pixels")
        pixels = [media[i].pixels for i in todo]
        if todo and len({p.shape[1:] for p in pixels}) == 1:
            encoded = self.encode(torch.cat(pixels)).split([len(p) for p in pixels])
        else:
            encoded = [self.encode(p) for p in pixels]
        out = list(media)
        for i, f in zip(todo, encoded):
            out[i] = Media(media[i].kind, features=f, times=media[i].times, text=media[i].text)
        return out

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """EVA features (T, 1+N, W), cls first, of preprocessed frames (T, 3, S, S)."""
        weight = self.vision.patch_embed.proj.weight
        return self.vision(pixels.to(device=weight.device, dtype=weight.dtype))

    def embed(self, input_ids, media: list, prompts: list, attention_mask=None, labels=None, left_pad=False):
        """Embed a batch of prompts with their visual tokens spliced in at the -200 placeholders.

        input_ids: (B, L) tensor (with attention_mask for padding) or a list of 1-D tensors. media[b]: a Media or
        None; prompts[b]: the guided prompts of sample b. The i-th
        placeholder of a sample gets the tokens made with its i-th prompt; in the long-video layout (one
        placeholder per token, `video_token` per frame) placeholder i takes token row i.
        Returns embeds (B, L', dim), attention_mask (B, L'), labels (B, L') or None.
        """
        embed_tokens = self.llm.tok_embeddings
        slots, guides = [], []
        for b in range(len(input_ids)):
            slots.append((input_ids[b] == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist())
            if slots[b] and (media is None or media[b] is None):
                raise ValueError(f"sample {b} has {len(slots[b])} <image> placeholder(s) but no image or video")
            guide = prompts[b] if slots[b] else None
            if slots[b] and media[b].kind != "movie" and isinstance(guide, (list, tuple)):
                guide = guide[:len(slots[b])]  # a later turn with no placeholder of its own gets no tokens: skip it
            guides.append(guide)
        vis = self.media_tokens(media, guides)
        rows, masks, row_labels = [], [], []
        for b in range(len(input_ids)):
            ids = input_ids[b]
            lab = labels[b] if labels is not None else None
            text = embed_tokens(ids.clamp(min=0))
            if not slots[b]:
                emb = text
            else:
                long_video, v = media[b].kind == "movie", vis[b].to(text.dtype)
                if long_video:
                    if len(slots[b]) != v.shape[1]:
                        raise ValueError(f"sample {b}: {v.shape[1]} visual tokens for {len(slots[b])} <image> "
                                         f"placeholders; the movie prompt needs {self.video_token} per frame")
                    emb = text.clone()
                    emb[slots[b]] = v[0]
                else:
                    if len(slots[b]) > v.shape[0]:
                        raise ValueError(f"sample {b} has {len(slots[b])} <image> placeholders but "
                                         f"{v.shape[0]} guided prompt(s); give one prompt per placeholder")
                    pieces, lab_pieces, start = [], [], 0
                    for i, s in enumerate(slots[b]):
                        pieces += [text[start:s], v[i]]
                        if lab is not None:
                            lab_pieces += [lab[start:s], lab.new_full((v.shape[1],), IGNORE_INDEX)]
                        start = s + 1
                    emb = torch.cat(pieces + [text[start:]])
                    if lab is not None:
                        lab = torch.cat(lab_pieces + [lab[start:]])
            m = torch.ones(len(ids), dtype=torch.long, device=text.device)
            if attention_mask is not None:
                m = attention_mask[b]
            # the tokens added by splicing sit before any padding, so the old mask aligns with the tail
            m = torch.cat([m.new_ones(len(emb) - len(ids)), m])
            rows.append(emb), masks.append(m), row_labels.append(lab)
        L = max(len(r) for r in rows)

        def pad(x, value):
            filler = x.new_full((L - len(x),) + tuple(x.shape[1:]), value)
            return torch.cat([filler, x] if left_pad else [x, filler])
        embeds = torch.stack([pad(r, 0) for r in rows])  # padding embeddings are zeros, as the original's
        mask = torch.stack([pad(m, 0) for m in masks])
        out_labels = torch.stack([pad(l, IGNORE_INDEX) for l in row_labels]) if labels is not None else None
        return embeds, mask, out_labels

    def forward(self, input_ids, media, prompts, attention_mask=None, labels=None):
        """Training / scoring forward: logits (B, L', V) and, with labels, the mean next-token cross-entropy."""
        embeds, mask, labels = self.embed(input_ids, media, prompts, attention_mask, labels)
        logits = self.llm(embeds=embeds, attention_mask=None if bool(mask.all()) else mask)
        loss = None
        if labels is not None:  # the mean over supervised tokens (0, not NaN, when there are none)
            targets = labels[:, 1:].flatten()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets, ignore_index=-100, reduction="sum")
            loss = loss / (targets != -100).sum().clamp(min=1)
            if self.training and all(m is None for m in media):
                # a text-only batch still runs the token generator on a blank frame, at zero weight: under
                # FSDP every process must run (and reduce gradients for) the same modules at every step
                blank = embeds.new_zeros(1, 1 + self.n_patches, self.mm_hidden_size)
                loss = loss + 0.0 * self.visual(blank, [""]).sum()
        return logits, loss

    @torch.no_grad()
    def generate(self, input_ids, media, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0,
                 eos_id=2, callback=None, generator=None, compile=False):
        """New token ids (B, n) for a batch of prompts (left-padded internally)."""
        embeds, mask, _ = self.embed(input_ids, media, prompts, left_pad=True)
        return generate(self.llm, embeds, max_new_tokens, attention_mask=mask, temperature=temperature,
                        top_p=top_p, eos_id=eos_id, callback=callback, generator=generator, compile=compile)

    @classmethod
    def from_pretrained(cls, model_dir, vision_path=None, bert_path=None, dtype=torch.float32, device="cpu",
                        load_vision: bool = True, download: Optional[bool] = None) -> "LlamaVID":
        """Load an original LLaMA-VID checkpoint directory, or a released one by its Hugging Face Hub id
        ("YanweiLi/llama-vid-7b-full-224-video-fps-1"); every released variant is told apart by config.json.

        Vision weights come from the directory when it holds them (the long-video model), else from the first
        of: vision_path, eva_vit_g.pth in the directory, eva_vit_g.pth beside it, config.json's mm_vision_tower,
        the download cache (checkpoint.eva_cache_path). download: fetch the EVA weights and bert-base-uncased's
        vocab.txt when they are found nowhere locally (default: when model_dir is a Hub id).
        """
        if download is None:
            download = is_hub_id(model_dir)
        model_dir = checkpoint_dir(model_dir)
        config = LlamaVIDConfig.from_hf(read_config(model_dir), source=model_dir / "config.json")
        if not (model_dir / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{model_dir / 'tokenizer.model'} is missing: a LLaMA-VID checkpoint directory "
                                    "needs the SentencePiece tokenizer.model it was trained with")
        return load_llamavid(model_dir, config, vision_path=vision_path, bert_path=bert_path, dtype=dtype,
                             device=device, load_vision=load_vision, download=download)


def load_llamavid(weights_dir: Path, config: LlamaVIDConfig, extra_tokens: Optional[dict] = None, vision_path=None,
                  bert_path=None, dtype=torch.float32, device="cpu", load_vision=True, download=False) -> LlamaVID:
    """The one builder of a LlamaVID from weights on disk (from_pretrained, and lora.load_lora_model, whose run
    brings its own config and token generator weights in extra_tokens). The LLM is built from config and filled
    shard by shard; the token generator's shapes come from its tensors, EVA's from its weight file."""
    vocab = find_bert_vocab(weights_dir, bert_path, download=download)
    llm, side = load_llm_and_rest(weights_dir, config, dtype, device)
    tokens = {**side["tokens"], **(extra_tokens or {})}
    if not tokens:
        raise ValueError(f"{weights_dir} holds no model.vlm_att_* / model.mm_projector.* weights: it is a plain "
                         "LLaMA checkpoint, not LLaMA-VID")
    visual = VisualTokenizer.from_llamavid(tokens, config.to_hf(), bert_path=vocab, num_heads=config.qformer_num_heads)
    visual = visual.to(device=device, dtype=dtype)
    vision = None
    if load_vision:
        source = side["vision"] or find_vision_weights(weights_dir, config.vision_tower, vision_path, download=download)
        vision = EVAViT.from_lavis(source, img_size=config.image_size, dtype=dtype, device=device)
        if vision.cfg.width != config.mm_hidden_size:
            raise ValueError(f"vision weights are {vision.cfg.width} wide but {weights_dir}/config.json has "
                             f"mm_hidden_size {config.mm_hidden_size}: wrong eva_vit_g.pth for this checkpoint")
    return LlamaVID(llm, vision, visual, config).eval()


def load_llm_and_rest(path: Path, config: LlamaVIDConfig, dtype, device):
    """The LLM of a checkpoint directory, loaded shard by shard, and the rest of its tensors set aside by owner:
    side["vision"] (model.vision_tower.vision_tower.*) and side["tokens"] (model.vlm_att_*, model.mm_projector.*)."""
    with torch.device("meta"):
        llm = LLaMA(config.llm)
    side = {"vision": {}, "tokens": {}}

    def rename(key):
        if key.startswith(VISION_PREFIX):
            return ("vision", key)
        if key.startswith(TOKEN_PREFIXES):
            return ("tokens", key)
        return hf_to_ours(key)
    load_weights(llm, path, rename, dtype=dtype, device=device, side=side)
    llm.inv_freq = llm._inv_freq(device)
    return llm, side


