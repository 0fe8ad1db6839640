"""Decoding: a prompt's embeddings prefilled into the static KV cache in chunks, then one token a step, greedy or
nucleus-sampled; with compile=True the decode step is captured by torch.compile with CUDA graphs and the prefill
runs through one compiled block (gpt-fast's techniques, kept here so model.py stays plain modules)."""
import math
from typing import Callable, Optional

import torch

def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None):
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_step(model, tok, input_pos, positions, attention_mask):
    """One token for each row: the step torch.compile + CUDA graphs capture (all shapes are static)."""
    return model(tokens=tok[:, None], attention_mask=attention_mask, positions=positions, input_pos=input_pos)[:, -1]


PREFILL_CHUNK = 16384  # prompt tokens a prefill step takes at most: bounds the activations of long prompts
_compiled_decode_steps = {}
_compiled_blocks = {}


def compiled_block(block_type):
    """block_type.forward (the decoder's Block) through torch.compile with dynamic shapes, for prefill: one graph
    serves every layer and every prompt length, with the norms, RoPE and SwiGLU fused around the matmuls (cuBLAS
    and flash attention stay)."""
    if block_type not in _compiled_blocks:
        _compiled_blocks[block_type] = torch.compile(block_type.forward, dynamic=True)
    return _compiled_blocks[block_type]


def compiled_decode_step(autotune: bool = True):
    """decode_step through torch.compile, with gpt-fast's settings: CUDA graphs (mode reduce-overhead: no launch
    overhead) and coordinate-descent tuning, with which inductor also turns a one-row matmul into a fused reduction:
    int8 weights are then cast in registers instead of being written out as a bf16 copy every step. autotune adds
    inductor's autotuned matmul templates, which pay for bf16 weights but not for quantised ones (docs/LOG.md)."""
    if autotune not in _compiled_decode_steps:
        _compiled_decode_steps[autotune] = torch.compile(decode_step, fullgraph=True, options={
            "triton.cudagraphs": True, "coordinate_descent_tuning": True, "triton.unique_kernel_names": True,
            "max_autotune_gemm": autotune})
    return _compiled_decode_steps[autotune]


@torch.no_grad()
def generate(model, embeds: torch.Tensor, max_new_tokens: int, attention_mask=None, temperature=0.0,
             top_p=1.0, eos_id: Optional[int] = 2, callback: Optional[Callable] = None, generator=None,
             compile: bool = False, prefill_chunk: int = PREFILL_CHUNK):
    """Continue prompts given as embeddings (B, T, dim); rows of a batch are left-padded (attention_mask 0).

    Returns (B, n) new token ids; a row that hit EOS is padded with EOS. callback(tokens (B,)) is called for
    every step, for streaming; returning True stops generation. compile=True runs the decode step through torch.compile
    with CUDA graphs, and the prefill of an unquantised model through compiled_block() (a quantised one's prefill,
    compute bound, runs its matmuls eagerly: compiled with dynamic shapes they were far slower).
    The prompt is prefilled in chunks of prefill_chunk tokens, so activations stay bounded for long prompts.
    """
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    embeds = embeds.detach()  # (a prompt embedded with grad enabled would give compiled code a second graph)
    B, T, _ = embeds.shape
    dev = embeds.device
    total = T + max_new_tokens
    if total > model.cfg.context_length:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                         f"{model.cfg.context_length} tokens")
    # the cache persists between calls (a compiled step keeps pointing at the same buffers); grow it if needed
    cache = model.layers[0].attention.kv_cache
    if cache is None or cache.k.shape[0] != B or cache.k.shape[2] < total or cache.k.dtype != embeds.dtype:
        size = min(model.cfg.context_length, max(total, 256 * math.ceil(total / 256)))
        model.setup_cache(B, size, dtype=embeds.dtype, device=dev)
    S = model.layers[0].attention.kv_cache.k.shape[2]
    key_mask, pad = None, torch.zeros(B, 1, dtype=torch.long, device=dev)
    if attention_mask is not None and not bool(attention_mask.all()):
        key_mask = torch.cat([attention_mask, attention_mask.new_ones(B, S - T)], dim=1)
        pad = (attention_mask == 0).sum(1, keepdim=True)  # left padding: a row's first real token is position 0
    block_fn = compiled_block(type(model.layers[0])) if compile and not model.quantized else None
    for start in range(0, T, prefill_chunk):
        input_pos = torch.arange(start, min(T, start + prefill_chunk), device=dev)
        logits = model(embeds=embeds[:, start:start + prefill_chunk], attention_mask=key_mask,
                       positions=(input_pos[None] - pad).clamp(min=0), input_pos=input_pos,
                       logits_from=len(input_pos) - 1, block_fn=block_fn)[:, -1]
    step = compiled_decode_step(autotune=not model.quantized) if compile else decode_step
    # Nothing in the loop waits for the GPU unless it must: the slot position lives on the device and advances in
    # place (a new host tensor each step would be a copy that waits for the queued work), and `done` is read
    # every 8 steps when no callback reads the tokens anyway. The host thus queues steps ahead of the GPU.
    pos = torch.tensor([T], device=dev)
    out, done = [], torch.zeros(B, dtype=torch.bool, device=dev)
    for i in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, generator)
        if eos_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            done |= tok == eos_id
        out.append(tok)
        if callback is not None and callback(tok):  # the caller may stop early (a stop string, a disconnect)
            break
        look = eos_id is not None and (callback is not None or i % 8 == 7)
        if i == max_new_tokens - 1 or (look and bool(done.all())):
            break
        logits = step(model, tok, pos, pos[None] - pad, key_mask).clone()  # clone: CUDA graphs reuse the output
        pos += 1
    tokens = torch.stack(out, dim=1)
    if eos_id is not None and tokens.shape[1] > 1:
        hit = tokens == eos_id
        if bool(hit.any(1).all()):  # every row ended: drop the steps after the last row's EOS (as if we had looked)
            tokens = tokens[:, :int(hit.int().argmax(1).max()) + 1]
    return tokens
