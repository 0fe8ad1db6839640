"""Speed of LLaMA-VID's parts on a GPU at the real shapes (Vicuna-7B, EVA-g, BERT-base Q-Former), random bf16 weights.
`python bench.py` prints a markdown table last; --out FILE writes it as JSON too; --tiny --device cpu: a smoke test."""
import copy
import dataclasses
import gc
import json
import math
import os
import random
import shutil
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from chat import ArgumentParser
from generate import PREFILL_CHUNK, generate
from lora import LoRAConfig, apply_lora, quantize_base
from media import encode_frames, iter_video
from model import Block, LLaMA, LLaMAConfig, LlamaVID, LlamaVIDConfig, Media, RMSNorm, peak_flops, training_flops
from quantize import Int4Linear, quantize_linear, quantize_model
from shapes import write_tokenizer
from tokens import TokenConfig, VisualTokenizer, _projector
from vision import EVAConfig, EVAViT

MOVIE_ROPE = {"type": "linear", "factor": 16.0}  # the long-video checkpoint's 4096 x 16 = 65,536 context

# the shapes of each run; --tiny scales everything down so the CPU path runs in seconds
REAL = dict(llm=LLaMAConfig, eva=EVAConfig, tok=TokenConfig, frames=8, text=77, new=128, reps=3,
            movie_frames=3600, movie_len=11970, patches=256, long_len=65536 - 128,
            agree_prompts=8, agree_new=32, eva_batch=64, qformer_frames=128, train_len=2048, train_vis=256,
            train_batch=4, train_accum=4, video_size=(720, 1280), video_seconds=3600, video_fps=1)
TINY = dict(llm=LLaMAConfig.tiny, eva=EVAConfig.tiny, tok=TokenConfig.tiny, frames=8, text=77, new=8, reps=1,
            movie_frames=60, movie_len=300, patches=16, long_len=2048 - 8,
            agree_prompts=4, agree_new=8, eva_batch=4, qformer_frames=8, train_len=64, train_vis=16,
            train_batch=2, train_accum=2, video_size=(72, 128), video_seconds=60, video_fps=1)
# rough seconds each section needs on an H100 (compiles included): a section is skipped when less than half is left
EXPECTED_S = {1: 90, 2: 90, 3: 30, 4: 240, 5: 20, 6: 10, 7: 40, 8: 40, 9: 60, 10: 90}
# the sections that compile first (short of time a later one decodes eagerly rather than compiling), the cheap ones
# last; the table is printed in section order
RUN_ORDER = [1, 8, 2, 4, 10, 7, 9, 5, 6, 3]

ROWS, FOOTNOTES, RESULTS = [], {}, {}
ARGS = None
T_START = time.perf_counter()


# ----------------------------------------------------------------------------------------------------------
# bookkeeping: progress lines, one row per measurement, errors recorded instead of raised

def log(msg):
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def time_left():
    return ARGS.budget - (time.perf_counter() - T_START)


def is_cuda():
    return ARGS.device.startswith("cuda")


def sync():
    if is_cuda():
        torch.cuda.synchronize()


def reset_peak():
    if is_cuda():
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if is_cuda() else None


def cleanup(dynamo=False):
    """Free what the last section left: python garbage, the allocator's cache and, after compiling, dynamo's
    compiled graphs and CUDA-graph pools (which hold on to the old model's buffers)."""
    if dynamo:
        try:
            torch._dynamo.reset()
            torch._inductor.cudagraph_trees.reset_cudagraph_trees()
        except Exception:  # noqa: BLE001 - best effort: a torch without these keeps its memory a little longer
            pass
    gc.collect()
    if is_cuda():
        torch.cuda.empty_cache()


class measure:
    """`with measure("1", "decode", "tok/s") as m: ...; m.value = x` records a row; an exception inside records the
    error in the row (and prints its traceback) instead of stopping the benchmark."""

    def __init__(self, section, name, unit=""):
        self.section, self.name, self.unit, self.value, self.note = str(section), name, unit, None, ""

    def __enter__(self):
        log(f"  {self.section}. {self.name} ...")
        return self

    def __exit__(self, kind, err, tb):
        row = dict(section=self.section, name=self.name, value=self.value, unit=self.unit, note=self.note)
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            return False
        if kind is not None:
            first = (str(err).strip().splitlines() or [""])[0]
            row["error"] = f"{kind.__name__}: {first[:200]}"
            print("".join(traceback.format_exception(kind, err, tb, limit=-4)), flush=True)
            if isinstance(err, torch.OutOfMemoryError):
                cleanup()
        ROWS.append(row)
        log(f"     -> {fmt(row)}")
        return True


def skip_row(section, name, why):
    ROWS.append(dict(section=str(section), name=name, value=None, unit="", note="", error=f"skipped: {why}"))
    log(f"  {section}. {name}: skipped ({why})")


def need(x, what):
    if x is None:
        raise RuntimeError(f"needs {what}, which failed above")
    return x


def fmt(row):
    if row.get("error"):
        return row["error"]
    v = row["value"]
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"
    return f"{v} {row['unit']}".strip()


def table():
    order = {str(s): i for i, s in enumerate(sorted(EXPECTED_S))}
    rows = sorted(ROWS, key=lambda r: order.get(r["section"], 99))  # stable: rows of a section keep their order
    lines = ["| # | measurement | value | notes |", "|---|---|---|---|"]
    cell = lambda text: str(text).replace("|", "/").replace("\n", " ")  # noqa: E731 - an error may hold either
    for r in rows:
        lines.append(f"| {r['section']} | {cell(r['name'])} | {cell(fmt(r))} | {cell(r['note'])} |")
    lines += [""] + [f"[{label}] {text}" for label, text in FOOTNOTES.items()]
    return "\n".join(lines)


def header():
    dev = torch.cuda.get_device_name() if is_cuda() else "cpu"
    peak = peak_flops(ARGS.device)
    return dict(device=dev, torch=torch.__version__, mode="tiny" if ARGS.tiny else "real shapes", dtype="bf16",
                peak_bf16_tflops=peak / 1e12 if peak else None, elapsed_s=round(time.perf_counter() - T_START, 1))


def save():
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            json.dump(dict(**header(), rows=ROWS, footnotes=FOOTNOTES, table=table()), f, indent=1)


# ----------------------------------------------------------------------------------------------------------
# random models, built on the device in bf16

@torch.no_grad()
def init_random_(model: nn.Module, seed=0, std=0.02):
    """Norm gains 1, biases 0, every other weight N(0, std); a LLaMA's residual outputs (wo, w2) get std / sqrt(2 L),
    GPT-2's scaling, so no single layer swamps the residual stream (a better-conditioned random model)."""
    torch.manual_seed(seed)
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    for mod_name, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, (nn.LayerNorm, RMSNorm)) or "Norm" in type(mod).__name__:  # HF's norms too
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif n_layers and mod_name.endswith(("attention.wo", "feed_forward.w2")):
                p.normal_(0.0, std / math.sqrt(2 * n_layers))
            else:
                p.normal_(0.0, std)
    return model


def build(cls, cfg, dtype=torch.bfloat16):
    """Construct on the meta device, allocate once on the target in the final dtype, fill with random weights:
    a 7B model is never built on the CPU, nor first in float32 when it runs in bf16."""
    with torch.device("meta"):
        model = cls(cfg)
    model.to(dtype=dtype).to_empty(device=ARGS.device)
    init_random_(model)
    if isinstance(model, LLaMA):
        model.inv_freq = model._inv_freq(ARGS.device)  # a float32 buffer computed at construction
    return model.eval().requires_grad_(False)


def build_llm(rope_scaling=None):
    return build(LLaMA, S["llm"](rope_scaling=rope_scaling))


def vocab_file():
    """A WordPiece vocabulary of bert-base-uncased's size (the Q-Former's embedding table) without downloading it:
    the special tokens, common words and filler; only the speed of the Q-Former matters here."""
    words = ("what is happening in the video movie describe this scene who where when why how does do are a an of to "
             "and man woman person people doing say happen after before end story main character").split()
    n = S["tok"]().qformer.vocab_size - 1  # "[DEC]" is added on top
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    toks = list(dict.fromkeys(specials + words + list("abcdefghijklmnopqrstuvwxyz?.,!")))
    toks += [f"[unused{i}]" for i in range(n - len(toks))]
    path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(toks[:n]) + "\n")
    return path


def build_visual():
    return build(VisualTokenizer, S["tok"]()).set_wordpiece(vocab_file())


def weight_gib(model):
    """Parameters and buffers, the KV cache excluded."""
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers() if "kv_cache" not in name]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def cache_len(total):
    return 256 * math.ceil(total / 256)  # what generate() allocates; set up beforehand so every call reuses it


def timeit(fn, reps):
    """Median wall time of fn() over reps runs, the device synchronised around each."""
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def warm_decode(llm, embeds, new, compile):
    """Compile + CUDA-graph warm-up and record (the first compiled calls are slow), cuBLAS heuristics. If compiling
    fails, say so and fall back to eager decoding. Returns (generate with the settings that work, how it decodes)."""
    run = partial(generate, llm, embeds, eos_id=None, compile=compile)
    try:
        t0 = time.perf_counter()
        run(max_new_tokens=min(new, 6))
        run(max_new_tokens=min(new, 6))
        if compile:  # later sections decide from this whether another compile still fits the budget
            RESULTS["compile_s"] = max(RESULTS.get("compile_s", 0.0), time.perf_counter() - t0)
        return run, ("torch.compile reduce-overhead (CUDA graphs)" if compile else "eager")
    except Exception as e:  # noqa: BLE001
        if not compile:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        log(f"     compiled decoding failed ({type(e).__name__}: {first}); measuring eager decoding instead")
        traceback.print_exc(limit=-4)
        cleanup(dynamo=True)
        run = partial(generate, llm, embeds, eos_id=None, compile=False)
        run(max_new_tokens=min(new, 6))
        return run, f"eager: compile failed ({type(e).__name__}: {first[:80]})"


def decode_speed(llm, embeds, new, compile, reps):
    """(time to first token, decode tok/s, how): generate 1 token (prefill + first token) and `new` tokens; decode
    speed is (new - 1) / the difference, the same rule as the HF row. The KV cache is sized once, so compiled calls
    reuse it (a new cache would mean new static shapes: a recompile)."""
    llm.clear_cache()
    llm.setup_cache(embeds.shape[0], min(llm.cfg.context_length, cache_len(embeds.shape[1] + new)),
                    dtype=embeds.dtype, device=embeds.device)
    run, how = warm_decode(llm, embeds, new, compile)
    t1 = timeit(lambda: run(max_new_tokens=1), reps)
    tn = timeit(lambda: run(max_new_tokens=new), reps)
    return t1, (new - 1) / max(tn - t1, 1e-9), how


def use_compile(section, needed_s):
    """Compile the decode step unless that would not fit the time left (judged by the slowest compile so far)."""
    if not ARGS.compile:
        return False
    needed_s = max(needed_s, 1.3 * RESULTS.get("compile_s", 0.0) + 20)
    if time_left() < needed_s:
        log(f"  {section}: {time_left():.0f}s of budget left: decoding eagerly instead of compiling")
        return False
    return True


def short_prompt(llm, batch=1, seed=0):
    """8 frames x 2 visual tokens + a 77-token question: the short-video prompt; token embeddings stand in for both."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, llm.cfg.vocab_size, (batch, S["frames"] * 2 + S["text"]), generator=g)
    return llm.tok_embeddings(ids.to(ARGS.device))


# ----------------------------------------------------------------------------------------------------------
# 1. decode, short prompt

def section_1():
    llm = None
    compile = use_compile(1, 60)
    with measure(1, "build Vicuna-7B (meta -> device, random bf16)", "s") as m:
        t0 = time.perf_counter()
        llm = build_llm().fuse()
        sync()
        m.value, m.note = time.perf_counter() - t0, f"{weight_gib(llm):.2f} GiB of weights; q/k/v and gate/up fused"
    emb = short_prompt(llm) if llm is not None else None
    with measure(1, f"decode, batch 1, {S['frames']}x2 + {S['text']} = {S['frames'] * 2 + S['text']}-token prompt, "
                    f"{S['new']} new tokens", "tok/s") as m:
        ttft, tps, m.note = decode_speed(need(llm, "the model"), emb, S["new"], compile, S["reps"])
        m.value = tps
        RESULTS["bf16_decode"], RESULTS["bf16_ttft"] = tps, ttft
    with measure(1, "time to first token (prefill + first token), same prompt", "ms") as m:
        m.value = 1e3 * need(RESULTS.get("bf16_ttft"), "the decode run")


# ----------------------------------------------------------------------------------------------------------
# 2. the movie: 3,600 frames of cached features -> Q-Former -> 7,200 visual tokens in an 11,970-token prompt

def movie_inputs():
    T, N, W = S["movie_frames"], S["patches"], S["tok"]().vision_width  # 3600 frames of 16 x 16 patches, EVA-g
    g = torch.Generator(device=ARGS.device).manual_seed(0)
    return torch.randn(T, N, W, generator=g, device=ARGS.device, dtype=torch.bfloat16)  # EVA output, cls dropped


def movie_embeds(llm, visual, features):
    """Visual tokens (1, 2 T, dim) of the long-video Q-Former, with text (system prompt, subtitles, question) around
    them to make the prompt movie_len tokens long."""
    vis = visual(features, ["What is the main story of this movie?"], long_video=True).to(torch.bfloat16)
    n_text = S["movie_len"] - vis.shape[1]
    if n_text < 2:
        raise ValueError(f"movie prompt of {S['movie_len']} tokens is shorter than its {vis.shape[1]} visual tokens")
    ids = torch.randint(0, llm.cfg.vocab_size, (1, n_text), device=ARGS.device)
    text = llm.tok_embeddings(ids)
    return torch.cat([text[:, :n_text // 4], vis, text[:, n_text // 4:]], dim=1)


@torch.no_grad()
def movie_run(section, llm, label, compile, decode_tokens):
    """Time to first token (Q-Former + prefill + first token), decode speed at that context, peak memory."""
    visual = features = emb = run = t_q = t_p = None
    shape = (S["movie_frames"], S["patches"], S["tok"]().vision_width)
    with measure(section, f"{label}: Q-Former context attention, {shape[0]:,} frames {shape} -> "
                          f"{2 * shape[0]:,} tokens", "s") as m:
        visual = build_visual()
        features = movie_inputs()
        llm.clear_cache()
        movie_embeds(llm, visual, features)  # warm-up, a whole untimed pass: kernels and cuBLAS heuristics of
        cleanup()                            # every block size, and the allocator's blocks, as a server has them
        reset_peak()  # from here on: weights + cached features + everything the movie needs

        def qformer():
            nonlocal emb
            emb = movie_embeds(llm, visual, features)
        m.value = t_q = timeit(qformer, 1)
        m.note = (f"{S['movie_frames'] / t_q:,.0f} frames/s (long-video mode, blocks of "
                  f"{visual.cfg.long_video_block} frames)")
    with measure(section, f"{label}: prefill + first token, {S['movie_len']:,}-token prompt", "s") as m:
        need(emb, "the Q-Former run")
        llm.clear_cache()
        llm.setup_cache(1, cache_len(S["movie_len"] + decode_tokens), dtype=torch.bfloat16, device=ARGS.device)
        run = partial(generate, llm, emb, eos_id=None, compile=compile)  # (1 token: only the prefill compiles)
        run(max_new_tokens=1)  # warm-up (and compile)
        m.value = t_p = timeit(lambda: run(max_new_tokens=1), max(1, S["reps"] - 1))
        m.note = f"{S['movie_len'] / t_p:,.0f} prompt tok/s" + (", layers through compiled_block()" if compile else "")
    with measure(section, f"{label}: time to first token, total (Q-Former + prefill + first token)", "s") as m:
        m.value = need(t_q, "the Q-Former run") + need(t_p, "the prefill run")
        m.note = f"Q-Former share {100 * t_q / (t_q + t_p):.0f} %"
    if ARGS.movie_only:
        skip_row(section, f"{label}: decode at {S['movie_len']:,} tokens of context", "--movie-only")
    else:
        with measure(section, f"{label}: decode at {S['movie_len']:,} tokens of context, {decode_tokens} new "
                              "tokens", "tok/s") as m:
            need(t_p, "the prefill run")
            run, m.note = warm_decode(llm, emb, decode_tokens, compile)
            tn = timeit(lambda: run(max_new_tokens=decode_tokens), 1)
            m.value = (decode_tokens - 1) / max(tn - t_p, 1e-9)
    with measure(section, f"{label}: peak GPU memory of the whole movie run", "GiB") as m:
        m.value = peak_gib()
        m.note = (f"weights {weight_gib(llm):.1f} + features {features.numel() * 2 / 2**30:.1f} + KV cache "
                  f"{2 * llm.cfg.n_layers * cache_len(S['movie_len'] + decode_tokens) * llm.cfg.dim * 2 / 2**30:.1f} "
                  "GiB + activations" if is_cuda() else "n/a on CPU")
    del visual, features, emb
    llm.clear_cache()


@torch.no_grad()
def section_2():
    compile = use_compile(2, 90)
    llm = None
    with measure(2, "build Vicuna-7B with rope_scaling linear x16 (65,536 context)", "s") as m:
        t0 = time.perf_counter()
        llm = build_llm(MOVIE_ROPE).fuse()
        m.value = time.perf_counter() - t0
    movie_run(2, need(llm, "the model"), "movie, bf16", compile, S["new"])


# ----------------------------------------------------------------------------------------------------------
# 3. a 64K-token prompt: prefill and peak memory

@torch.no_grad()
def section_3():
    llm = build_llm(MOVIE_ROPE).fuse()
    T = S["long_len"]
    with measure(3, f"prefill + first token, {T:,}-token prompt", "s") as m:
        ids = torch.randint(0, llm.cfg.vocab_size, (1, T), device=ARGS.device)
        emb = llm.tok_embeddings(ids)
        del ids
        warm = emb[:, :min(T, PREFILL_CHUNK + 512)]  # warm-up: one full chunk and a masked one
        llm.setup_cache(1, cache_len(warm.shape[1] + 1), dtype=torch.bfloat16, device=ARGS.device)
        generate(llm, warm, 1, eos_id=None)
        llm.clear_cache()
        cleanup()
        reset_peak()
        m.value = t = timeit(lambda: generate(llm, emb, 1, eos_id=None), 1)
        m.note = (f"{T / t:,.0f} prompt tok/s; chunks of {PREFILL_CHUNK:,} tokens (causal, bottom-right aligned, "
                  f"flash); KV cache {cache_len(T + 1):,} slots")
    with measure(3, f"peak GPU memory, {T:,}-token prefill", "GiB") as m:
        m.value = peak_gib()
        kv = 2 * llm.cfg.n_layers * cache_len(T + 1) * llm.cfg.dim * 2 / 2**30
        m.note = f"weights {weight_gib(llm):.1f} + KV cache {kv:.1f} GiB + activations" if is_cuda() else "n/a on CPU"
    llm.clear_cache()


# ----------------------------------------------------------------------------------------------------------
# 4. int8 / int4 weight-only quantisation: speed, agreement with bf16, the movie's memory in int4

@torch.no_grad()
def agreement(ref_model, q_model, prompts, ref_tokens):
    """Free-running: the share of generated tokens equal to bf16's (a flip changes the rest of the row).
    Teacher-forced: fed bf16's tokens, the share of steps whose greedy choice is bf16's (each step on its own).
    Also the logits' relative error and bf16's top-1 margin in units of the logits' std."""
    q_model.clear_cache()
    q_tokens = generate(q_model, prompts, ref_tokens.shape[1], eos_id=None)
    free = (q_tokens == ref_tokens).float().mean().item()
    full = torch.cat([prompts, q_model.tok_embeddings(ref_tokens[:, :-1])], dim=1)
    T = prompts.shape[1]
    ref_logits = ref_model(embeds=full, logits_from=T - 1)
    q_logits = q_model(embeds=full, logits_from=T - 1)
    forced = (q_logits.argmax(-1) == ref_tokens).float().mean().item()
    rel = ((q_logits - ref_logits).norm() / ref_logits.norm()).item()
    top2 = ref_logits.topk(2, dim=-1).values
    margin = ((top2[..., 0] - top2[..., 1]) / ref_logits.std(-1)).median().item()
    return free, forced, rel, margin


def sharing_layers(llm, emb, head):
    """A model that runs llm's decoder layers and final norm (shared, not copied) between its own embedding table
    and output head."""
    with torch.device("meta"):
        m = LLaMA(llm.cfg)
    m.layers, m.norm, m.inv_freq = llm.layers, llm.norm, llm.inv_freq
    m.tok_embeddings, m.output = emb, head
    return m.eval()


@torch.no_grad()
def conditioned_ends(llm, std=0.2, seed=1):
    """Embedding table and output head of a well-conditioned random model: embeddings N(0, std^2) (10x the init's
    0.02, so each token's own direction is about 1/8 of the final residual stream instead of ~1 %) and a head whose
    rows are the embeddings in a fixed random order (token i 'predicts' perm(i)). The decoder layers stay the random
    ones and still move every logit; what changes is that the greedy choice has a margin, as a trained model's has."""
    V, d = llm.cfg.vocab_size, llm.cfg.dim
    g = torch.Generator(device=ARGS.device).manual_seed(seed)
    table = torch.randn(V, d, generator=g, device=ARGS.device).mul_(std).to(torch.bfloat16)
    perm = torch.randperm(V, generator=g, device=ARGS.device)
    with torch.device("meta"):
        emb, head = nn.Embedding(V, d), nn.Linear(d, V, bias=False)
    emb.weight = nn.Parameter(table, requires_grad=False)
    head.weight = nn.Parameter(table[perm].contiguous(), requires_grad=False)
    return emb, head


@torch.no_grad()
def section_4():
    llm = build_llm().fuse()
    n, new = S["agree_prompts"], S["agree_new"]
    cond = sharing_layers(llm, *conditioned_ends(llm))
    refs = {}
    for name, model in (("plain", llm), ("conditioned", cond)) if not ARGS.movie_only else ():
        prompts = short_prompt(model, batch=n, seed=1)
        model.clear_cache()
        refs[name] = (model, prompts, generate(model, prompts, new, eos_id=None))  # eager, batch n: the reference
    model = None  # (the loop variable would keep the bf16 layers alive through the int4 movie below)
    llm.clear_cache()
    emb = short_prompt(llm)
    FOOTNOTES["agreement"] = (
        "Random weights are not a trained model. With the plain init (N(0, 0.02), GPT-2's 1/sqrt(2L) on the residual "
        "outputs) a random LLaMA's top-1 margin is ~0.2 std of its logits (the gap between the two largest of 32,000 "
        "near-Gaussian values) and any perturbation flips the argmax; those numbers are given in the notes as 'plain'. "
        "The row values use a well-conditioned random model built for this test (bench.conditioned_ends): the same "
        "random decoder layers (shared), embeddings N(0, 0.2^2) and an output head made of the embeddings in a fixed "
        "random order, so the greedy token has a margin of a few std, as a trained model's confident tokens have "
        "(its measured median margin is in the notes). It shows the int8/int4 kernels keep the greedy choice where "
        "there is a choice to keep; it is not a measurement of quality on real weights. 'teacher-forced' counts each "
        "step on its own, 'free-running' (the value) lets one flip change the rest of the row.")
    q = None
    for mode in ("int8", "int4") if not ARGS.movie_only else ():
        q = None
        with measure(4, f"{mode} weight-only: quantise the bf16 model", "s") as m:
            t0 = time.perf_counter()
            q = quantize_model(copy.deepcopy(llm), mode, groupsize=128)
            sync()
            m.value = time.perf_counter() - t0
            backends = {mod.backend for mod in q.modules() if isinstance(mod, Int4Linear)}
            m.note = f"{weight_gib(q):.2f} GiB of weights" + (f"; int4 backend {', '.join(backends)}, group 128"
                                                              if backends else "; per-channel scales")
        with measure(4, f"{mode} greedy agreement with bf16, {n} prompts x {new} tokens, well-conditioned random "
                        "model", "%") as m:
            need(q, "the quantised model")
            q_cond = sharing_layers(q, cond.tok_embeddings, quantize_linear(cond.output, mode, 128))
            free, forced, rel, margin = agreement(cond, q_cond, *refs["conditioned"][1:])
            p_free, p_forced, p_rel, p_margin = agreement(llm, q, *refs["plain"][1:])
            del q_cond
            m.value = 100 * free
            m.note = (f"free-running; teacher-forced {100 * forced:.1f} %; logits rel. error {rel:.3f}; bf16 top-1 "
                      f"margin {margin:.2f} std. Plain init: free {100 * p_free:.1f} %, forced {100 * p_forced:.1f} %, "
                      f"rel. error {p_rel:.3f}, margin {p_margin:.2f} std [agreement]")
        kernel = ", torch's int4 kernel (tinygemm)" if mode == "int4" else ""
        with measure(4, f"{mode} decode, batch 1, short prompt, {S['new']} new tokens{kernel}", "tok/s") as m:
            compile = use_compile(4, 60)
            ttft, tps, how = decode_speed(need(q, "the quantised model"), emb, S["new"], compile, S["reps"])
            m.value = tps
            base = RESULTS.get("bf16_decode")
            m.note = how + f"; TTFT {1e3 * ttft:.0f} ms" + \
                (f"; {tps / base:.2f}x bf16 (row 1)" if base else "")
        if mode == "int8":
            del q
            cleanup(dynamo=True)
            with measure(4, f"int4 decode, batch 1, short prompt, {S['new']} new tokens, backend 'dequant' (codes two "
                            "a byte, unpacked inside the compiled step)", "tok/s") as m:
                # the other int4 layout: no int4 kernel; inductor fuses unpacking, scaling and the one-row matmul
                qd = quantize_model(copy.deepcopy(llm), "int4", groupsize=128, backend="dequant")
                ttft, tps, how = decode_speed(qd, emb, S["new"], use_compile(4, 60), S["reps"])
                m.value = tps
                base = RESULTS.get("bf16_decode")
                m.note = how + f"; TTFT {1e3 * ttft:.0f} ms" + (f"; {tps / base:.2f}x bf16 (row 1)" if base else "")
            qd = None
            cleanup(dynamo=True)
    if ARGS.movie_only:
        q = quantize_model(copy.deepcopy(llm), "int4", groupsize=128)
    # the movie with int4 weights: only the int4 model on the device
    del llm, cond, refs
    if q is None:
        skip_row(4, "movie, int4", "int4 quantisation failed above")
        return
    q.clear_cache()
    cleanup(dynamo=True)
    q.cfg = dataclasses.replace(q.cfg, rope_scaling=MOVIE_ROPE)
    if time_left() > 30:
        movie_run(4, q, "movie, int4", False, 16 if not ARGS.tiny else 4)
    else:
        skip_row(4, "movie, int4", "time budget")


# ----------------------------------------------------------------------------------------------------------
# 5. EVA-g: ours (eager and compiled) vs timm's Eva, same shapes

def timm_eva(cfg):
    try:
        from timm.models.eva import Eva  # optional: only this section's reference needs it
    except ImportError:
        raise RuntimeError("the reference EVA is timm's: pip install timm") from None
    with torch.device(ARGS.device):
        model = Eva(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0, embed_dim=cfg.width,
                    depth=cfg.depth, num_heads=cfg.heads, qkv_bias=True, mlp_ratio=(cfg.mlp_hidden + 0.5) / cfg.width,
                    swiglu_mlp=False, use_rot_pos_emb=False, norm_layer=partial(nn.LayerNorm, eps=cfg.eps))
    model.norm = nn.Identity()  # LAVIS' EVA has no final norm
    if model.blocks[0].mlp.fc1.out_features != cfg.mlp_hidden:
        raise ValueError(f"timm Eva built with MLP width {model.blocks[0].mlp.fc1.out_features}, not {cfg.mlp_hidden}")
    return model.to(torch.bfloat16).eval().requires_grad_(False)


@torch.no_grad()
def section_5():
    cfg = S["eva"]()
    B = S["eva_batch"]
    pixels = torch.randn(B, 3, cfg.img_size, cfg.img_size, device=ARGS.device, dtype=torch.bfloat16)
    reps = max(3, S["reps"] + 2)
    label = f"batch {B}, {cfg.img_size}px, {cfg.depth} blocks, bf16"
    ours = None
    with measure(5, f"EVA-g ours, eager, {label}", "frames/s") as m:
        ours = build(EVAViT, cfg)
        ours(pixels)
        m.value = B / timeit(lambda: ours(pixels), reps)
    with measure(5, f"EVA-g timm Eva, eager, {label}", "frames/s") as m:
        ref = timm_eva(cfg)
        ref.forward_features(pixels)
        m.value = B / timeit(lambda: ref.forward_features(pixels), reps)
        m.note = "same shapes, fused SDPA attention, no rope"
        del ref
        cleanup()
    if not ARGS.compile or time_left() < 60:
        why = "compile is off (--compile off, or a CPU run)" if not ARGS.compile else "time budget"
        skip_row(5, f"EVA-g ours, torch.compile, {label}", why)
        return
    with measure(5, f"EVA-g ours, torch.compile, {label}", "frames/s") as m:
        need(ours, "our EVA")
        for block in ours.blocks:  # regional compilation: the 39 identical blocks share one compiled graph
            block.compile()
        t0 = time.perf_counter()
        ours(pixels)
        ours(pixels)
        compile_s = time.perf_counter() - t0
        m.value = B / timeit(lambda: ours(pixels), reps)
        m.note = f"each block compiled (one graph for all), {compile_s:.0f} s to compile"
    del ours
    cleanup(dynamo=True)


# ----------------------------------------------------------------------------------------------------------
# 6. Q-Former + token generation, short-video mode

@torch.no_grad()
def section_6():
    T = S["qformer_frames"]
    with measure(6, f"Q-Former + context/content tokens, short-video mode, {T} frames x (1+{S['patches']}) tokens, "
                    "1 prompt, one batch", "frames/s") as m:
        visual = build_visual()
        W = visual.cfg.vision_width
        features = torch.randn(T, 1 + S["patches"], W, device=ARGS.device, dtype=torch.bfloat16)
        prompt = ["What is the man in the video doing after he opens the door?"]
        visual(features, prompt)
        t = timeit(lambda: visual(features, prompt), max(3, S["reps"] + 2))
        m.value = T / t
        m.note = f"{1e3 * t:.1f} ms for the batch -> ({1}, {2 * T}, {visual.cfg.llm_dim}) tokens"


# ----------------------------------------------------------------------------------------------------------
# 7. training steps: stage 1 (LLM frozen, projector trained) at 7B, stage 2 (all trained) at a depth that fits

def step_flops(llm, sequences):
    """Model FLOPs of a training step over `sequences` of train_len tokens: model.training_flops, the definition
    train.py reports against (it counts the weights that require grad as trained: set them before calling)."""
    T = S["train_len"]
    return training_flops(llm, sequences * T, T)


def train_step_fn(llm, proj, feats, ids, labels, opt, autocast, accum=1):
    """One optimizer step over `accum` micro-batches (the same batch each time here: only the speed is measured).
    feats (B, n_vis, W) go through the projector in front of the text embeddings of ids (B, T - n_vis)."""
    def step():
        for _ in range(accum):
            ctx = torch.autocast(device_type="cuda" if is_cuda() else "cpu", dtype=torch.bfloat16, enabled=autocast)
            with ctx:
                vis = proj(feats)  # (B, n_vis, dim)
                text = llm.tok_embeddings(ids)
                logits = llm(embeds=torch.cat([vis.to(text.dtype), text], dim=1))
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def train_inputs(cfg, batch, seed=0):
    T, n_vis, W = S["train_len"], S["train_vis"], S["tok"]().vision_width
    g = torch.Generator(device=ARGS.device).manual_seed(seed)
    feats = torch.randn(batch, n_vis, W, device=ARGS.device, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (batch, T - n_vis), device=ARGS.device, generator=g)
    labels = torch.randint(0, cfg.vocab_size, (batch, T), device=ARGS.device, generator=g)
    return feats, ids, labels


def mfu_note(t, flops, extra=""):
    peak = peak_flops(ARGS.device)
    return (f"{1e3 * t:.0f} ms/step, " + (f"MFU {100 * flops / t / peak:.1f} %" if peak else "MFU n/a") +
            f" ({flops / t / 1e12:.0f} TFLOP/s model [MFU]){extra}; peak memory "
            + (f"{peak_gib():.1f} GiB" if is_cuda() else "n/a"))


def section_7():
    cfg = S["llm"]()
    T, n_vis = S["train_len"], S["train_vis"]
    W = S["tok"]().vision_width
    peak = peak_flops(ARGS.device)
    FOOTNOTES["MFU"] = (
        "MFU = model FLOPs / step time / the GPU's dense bf16 peak (model.peak_flops: " +
        (f"{peak / 1e12:.0f} TFLOP/s for {torch.cuda.get_device_name()}" if peak else "unknown here") + "). "
        "Model FLOPs = model.training_flops, the definition train.py reports against (forward over the LLM's matmul "
        "weights, the gradients of the activations through every layer, those of the weights that train: none in "
        "stage 1, all in stage 2; attention without the causal saving; no gradient-checkpoint recompute; the "
        "projector, EVA and the Q-Former not counted). The optimizer step's time is in the step time.")
    reps = max(3, S["reps"] + 2)

    with measure(7, f"stage 1 step: Vicuna-7B frozen + mlp2x_gelu projector trained, 1 x {T:,} tokens "
                    f"({n_vis} visual), bf16, grad. checkpointing", "tok/s") as m:
        llm = build_llm()  # requires_grad off: training_flops counts no weight gradients for it
        llm.gradient_checkpointing = True
        llm.train()  # checkpointing is active in train mode; the LLM has no dropout
        proj = _projector("mlp2x_gelu", W, cfg.dim).to(device=ARGS.device, dtype=torch.bfloat16)
        opt = torch.optim.AdamW(proj.parameters(), lr=1e-3, fused=is_cuda())
        feats, ids, labels = train_inputs(cfg, 1)
        step = train_step_fn(llm, proj, feats.to(torch.bfloat16), ids, labels, opt, autocast=False)
        step()
        reset_peak()
        t = timeit(step, reps)
        m.value = T / t
        m.note = mfu_note(t, step_flops(llm, 1))
    llm = proj = opt = step = None
    cleanup()

    # stage 2 as the original runs it on each GPU: micro-batches of 4 x 2,048 tokens, 4 of them accumulated per
    # optimizer step (its global batch 128 = 8 GPUs x 4 x 4). fp32 master weights, bf16 autocast, fused AdamW with
    # fp32 states: 16 bytes a parameter, so the full 7B (~110 GB) does not fit one GPU: take as many 7B-wide layers
    # as fit, without gradient checkpointing (the activations of a micro-batch are kept: ~0.5 GB a layer per
    # 2,048-token sequence, plus the bf16 weight copies autocast keeps for the backward pass)
    B, accum = S["train_batch"], S["train_accum"]
    with torch.device("meta"):
        layer_params = sum(p.numel() for p in Block(cfg).parameters())
    per_layer = 18 * layer_params + B * T / 2048 * 0.55 * 2**30 * (cfg.dim / 4096)
    fixed = 16 * 2 * cfg.dim * cfg.vocab_size + 4 * 4 * B * T * cfg.vocab_size  # embedding + head, fp32 logits
    if is_cuda():
        free = torch.cuda.mem_get_info()[0]
        depth = int(max(1, min(cfg.n_layers, (0.85 * free - fixed) // per_layer)))
    else:
        depth = cfg.n_layers
    feats, ids, labels = train_inputs(cfg, B)
    for attempt in range(2):
        with measure(7, f"stage 2 step: all weights trained, {depth} of {cfg.n_layers} Vicuna-7B layers, "
                        f"{accum} micro-batches of {B} x {T:,} tokens, fp32 master + bf16 autocast, fused AdamW, "
                        "no grad. checkpointing" + (", blocks compiled" if ARGS.compile else ""), "tok/s") as m:
            oom = False
            try:
                llm = build(LLaMA, dataclasses.replace(cfg, n_layers=depth), dtype=torch.float32)
                llm.requires_grad_(True).train()
                llm.gradient_checkpointing = False
                if ARGS.compile:  # train.py's compile=True: each block compiled (one graph for all)
                    for block in llm.layers:
                        block.compile()
                proj = _projector("mlp2x_gelu", W, cfg.dim).to(device=ARGS.device)
                params = list(llm.parameters()) + list(proj.parameters())
                opt = torch.optim.AdamW(params, lr=2e-5, fused=is_cuda())
                step = train_step_fn(llm, proj, feats, ids, labels, opt, autocast=True, accum=accum)
                step()
                reset_peak()
                t = timeit(step, max(2, S["reps"] - 1))
            except torch.OutOfMemoryError:
                oom = True
                llm = proj = opt = step = params = None
                cleanup()
                if attempt == 0 and depth > 1:
                    raise RuntimeError(f"out of memory at {depth} layers; retrying with {depth // 2}")
                raise
            m.value = B * accum * T / t
            n_params = sum(p.numel() for p in params)
            RESULTS["stage2_tps"] = m.value
            m.note = mfu_note(t, step_flops(llm, B * accum), f"; {n_params / 1e9:.2f} B params; depth chosen "
                              "to fit")
        llm = proj = opt = step = params = None
        cleanup()
        if not oom:
            break
        depth //= 2


# ----------------------------------------------------------------------------------------------------------
# 9. LoRA fine-tuning with int4 base weights (QLoRA-style) at Vicuna-7B shapes: does it fit a 24 GB card?

def section_9():
    cfg = S["llm"]()
    T, W = S["train_len"], S["tok"]().vision_width
    lcfg = LoRAConfig()
    label = (f"LoRA step (r {lcfg.r}, alpha {lcfg.alpha:g}, dropout {lcfg.dropout}, all 7 projections) on Vicuna-7B "
             f"with int4 base weights (group 128) + projector, 1 x {T:,} tokens, grad. checkpointing, bf16 autocast, "
             "AdamW")
    build_peak = None
    with measure(9, label, "tok/s") as m:
        reset_peak()
        llm = build_llm()  # bf16 on the device, then every projection's base swapped for int4
        adapters = apply_lora(llm, lcfg, dtype=torch.float32)  # float32 adapters: they are the master weights
        quantize_base(llm, "int4")
        llm.float()  # embeddings, norms and head in float32, as train.py holds a model (int4 codes stay uint8)
        llm.gradient_checkpointing = True
        llm.train()  # LoRA dropout on
        proj = _projector("mlp2x_gelu", W, cfg.dim).to(device=ARGS.device)
        opt = torch.optim.AdamW(adapters + list(proj.parameters()), lr=2e-4, fused=is_cuda())
        feats, ids, labels = train_inputs(cfg, 1)
        step = train_step_fn(llm, proj, feats, ids, labels, opt, autocast=True)
        step()
        build_peak = peak_gib()
        reset_peak()
        t = timeit(step, max(3, S["reps"] + 1))
        m.value = T / t
        full = RESULTS.get("stage2_tps")
        m.note = (f"{1e3 * t:.0f} ms/step; {sum(p.numel() for p in adapters) / 1e6:.0f} M adapter params; "
                  f"int4 base {weight_gib(llm):.1f} GiB with the float32 embeddings and head"
                  + (f"; full fine-tuning (row 7, no checkpointing, fp32 master) {full:,.0f} tok/s" if full else ""))
    with measure(9, "LoRA int4 step: peak GPU memory (training steps)", "GiB") as m:
        m.value = peak_gib()
        m.note = (f"target <= 20 GiB (a 24 GB card); building the bf16 model and quantising it peaked at "
                  f"{build_peak:.1f} GiB" if build_peak is not None else "")
    llm = proj = opt = step = adapters = None
    cleanup()


# ----------------------------------------------------------------------------------------------------------
# training data at the real lengths, for train.py at the real shapes (config/random7b.py): written once

TRAIN_WORDS = ("the a man woman dog car street red blue green walks runs holds looks table window light small large "
               "people two three scene background left right front behind open closed tree water sky building "
               "picture video shows describe what where who why how is are there this that with without").split()


def write_train_data(out, n_samples=2048, n_images=64, n_videos=32, video_frames=64, seed=0):
    """A LLaVA-format training set of random images and videos and conversations of the real lengths (an image
    conversation ~1,500 text tokens over several turns, as LLaVA-665K's long ones; a video one ~300 with 64 frames
    at 1 fps, as VideoChatGPT's), plus a LLaMA-style tokenizer and a WordPiece vocabulary of bert-base-uncased's
    size: what train.py needs at the real shapes without a download. Nothing is written when out holds it."""
    out = Path(out)
    if (out / "data.json").is_file():
        return out
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(exist_ok=True)
    noise = np.random.default_rng(seed)
    for i in range(n_images):
        Image.fromarray(noise.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(out / "images" / f"{i}.jpg")
    for i in range(n_videos):
        synthetic_video(out / "videos" / f"{i}.mp4", video_frames, 1, (240, 320))

    def words(n):
        return " ".join(rng.choice(TRAIN_WORDS) for _ in range(n))

    samples, text = [], []
    for k in range(n_samples):
        video = k % 5 == 4  # a fifth are videos, as the stage-2 mix's VideoChatGPT share
        turns = 1 if video else rng.randint(4, 8)
        per_turn = (240 if video else 1400) // turns
        conv = []
        for t in range(turns):
            q, a = words(per_turn // 6), words(per_turn - per_turn // 6)
            conv += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
            text += [q, a]
        media = {"video": f"videos/{k % n_videos}.mp4"} if video else {"image": f"images/{k % n_images}.jpg"}
        samples.append({"id": k, **media, "conversations": conv})
    write_tokenizer(out, text[:4000], vocab_size=8000)
    shutil.copyfile(vocab_file(), out / "vocab.txt")
    (out / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768, "num_attention_heads": 12}))
    (out / "data.json").write_text(json.dumps(samples))
    return out


# ----------------------------------------------------------------------------------------------------------
# 10. an hour of 720p video, from the .mp4 to the first answer token

def synthetic_video(path, seconds, fps, size):
    """An H.264 file (libx264, preset veryfast, yuv420p) of `seconds` at `fps`: a random texture that pans plus a
    patch of fresh noise that moves, so each frame has motion and new detail for the codec (not a still)."""
    H, W = size
    rng = np.random.default_rng(0)
    texture = np.kron(rng.integers(16, 236, (H // 8 + 1, W // 8 + 1), dtype=np.uint8), np.ones((8, 8), np.uint8))
    chroma = np.kron(rng.integers(64, 192, (H // 32 + 1, W // 32 + 1), dtype=np.uint8), np.ones((16, 16), np.uint8))
    p = min(128, H // 4, W // 4)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(int(seconds * fps)):
            y = np.roll(texture, (3 * i, 7 * i), axis=(0, 1))[:H, :W].copy()
            r, c = (37 * i) % (H - p), (53 * i) % (W - p)
            y[r:r + p, c:c + p] = rng.integers(0, 256, (p, p), dtype=np.uint8)
            uv = np.roll(chroma, i, axis=1)[:H // 2, :W // 2]
            planes = np.concatenate([y, uv[:, :W // 4 * 2].reshape(H // 4, W), uv[:, :W // 4 * 2].reshape(H // 4, W)])
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@torch.no_grad()
def section_10():
    H, W = S["video_size"]
    seconds, fps = S["video_seconds"], S["video_fps"]
    path = os.path.join(tempfile.mkdtemp(), "hour.mp4")
    with measure(10, f"make the test video: {seconds / 60:.0f} min of {W}x{H} H.264 at {fps} fps (not timed below)",
                 "s") as m:
        t0 = time.perf_counter()
        synthetic_video(path, seconds, fps, (H, W))
        m.value = time.perf_counter() - t0
        m.note = f"{os.path.getsize(path) / 2**20:.0f} MiB, {seconds * fps:,} frames"
    llm = build_llm(MOVIE_ROPE).fuse()
    vision = build(EVAViT, S["eva"]())
    visual = build_visual()
    model = LlamaVID(llm, vision, visual, LlamaVIDConfig(llm=llm.cfg, mm_hidden_size=visual.cfg.vision_width,
                                                         image_size=vision.cfg.img_size,
                                                         patch_size=vision.cfg.patch_size))
    question = "What is the main story of this movie?"
    # warm-up: the decoder library, EVA's and the Q-Former's kernels, cuBLAS heuristics, a short prefill
    warm, _ = encode_frames(model, iter_video(path, fps=fps, max_frames=64), batch_size=64, keep_on_device=True,
                            progress=False)
    emb = movie_embeds_from(llm, model.media_tokens([Media("movie", features=warm)], [[question]])[0], 512)
    generate(llm, emb, 1, eos_id=None)
    del warm, emb
    llm.clear_cache()
    cleanup()
    stats, times = {}, {}
    with measure(10, f"{seconds / 60:.0f} min of {W}x{H} video (.mp4) to the first answer token: decode at {fps} fps "
                     "+ EVA + Q-Former + prefill + first token", "s") as m:
        sync()
        t0 = time.perf_counter()
        feats, _ = encode_frames(model, iter_video(path, fps=fps), batch_size=64, keep_on_device=True,
                                 stats=stats, progress=False)  # the timings below are the report
        sync()
        times["decode+EVA"] = time.perf_counter() - t0
        tokens = model.media_tokens([Media("movie", features=feats)], [[question]])[0]
        emb = movie_embeds_from(llm, tokens, None)
        sync()
        times["Q-Former"] = time.perf_counter() - t0 - times["decode+EVA"]
        generate(llm, emb, 1, eos_id=None)
        sync()
        total = m.value = time.perf_counter() - t0
        times["prefill"] = total - times["decode+EVA"] - times["Q-Former"]
        n = feats.shape[0]
        m.note = (f"{n:,} frames, {emb.shape[1]:,}-token prompt; decode + EVA (overlapped) "
                  f"{times['decode+EVA']:.1f} s, Q-Former {times['Q-Former']:.2f} s, prefill + first token "
                  f"{times['prefill']:.2f} s; peak " + (f"{peak_gib():.1f} GiB" if is_cuda() else "n/a"))
    with measure(10, "share of that time spent decoding the video", "%") as m:
        m.value = 100 * need(stats.get("decode_s"), "the video run") / need(total, "the video run")
        rate = n / stats["decode_s"]
        m.note = (f"{stats['decode_s']:.1f} s in the decoder (PyAV, threaded) for {n:,} frames = {rate:,.0f} frames/s, "
                  f"overlapped with preprocessing (8 threads) and EVA (batches of 64). This file holds only the "
                  f"sampled frames ({fps} fps); PyAV decodes every frame, so a 25 fps source of the same hour would "
                  f"cost ~{25 / fps * stats['decode_s']:,.0f} s of decoding at this rate")
    del model, llm, vision, visual, feats
    cleanup()


def movie_embeds_from(llm, vis, length):
    """The movie prompt around visual tokens (1, n, dim): text before and after, movie_len tokens in all (or the
    visual tokens plus the text the movie prompt has beyond them, when length is None)."""
    vis = vis.to(torch.bfloat16)
    n_text = (S["movie_len"] - 2 * S["movie_frames"]) if length is None else max(2, length - vis.shape[1])
    ids = torch.randint(0, llm.cfg.vocab_size, (1, n_text), device=ARGS.device)
    text = llm.tok_embeddings(ids)
    return torch.cat([text[:, :n_text // 4], vis, text[:, n_text // 4:]], dim=1)


# ----------------------------------------------------------------------------------------------------------
# 8. the anchor: HF transformers' LlamaForCausalLM, same shapes, same prompt length, eager generate

@torch.no_grad()
def section_8():
    try:
        import transformers  # optional: only this section's reference needs it
    except ImportError:
        raise RuntimeError("the reference decoder is HF transformers': pip install transformers") from None
    transformers.logging.set_verbosity_error()
    c = S["llm"]()
    hf_cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                      num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
                                      rms_norm_eps=c.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    new = S["new"]
    T = S["frames"] * 2 + S["text"]
    with measure(8, f"HF transformers LlamaForCausalLM decode, batch 1, {T}-token prompt, {new} new tokens",
                 "tok/s") as m:
        with torch.device(ARGS.device):
            hf = transformers.LlamaForCausalLM._from_config(hf_cfg, dtype=torch.bfloat16)
        hf = init_random_(hf.eval())
        ids = torch.randint(0, c.vocab_size, (1, T), device=ARGS.device)

        def gen(n):
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
            if out.shape[1] != T + n:
                raise RuntimeError(f"HF generate gave {out.shape[1] - T} tokens, not {n}")
        gen(min(new, 8))
        t1 = timeit(lambda: gen(1), S["reps"])
        tn = timeit(lambda: gen(new), max(1, S["reps"] - 1))
        m.value = tps = (new - 1) / max(tn - t1, 1e-9)
        ours = RESULTS.get("bf16_decode")
        m.note = (f"transformers {transformers.__version__}, sdpa, eager generate (dynamic cache), greedy; TTFT "
                  f"{1e3 * t1:.0f} ms" + (f"; ours (row 1) is {ours / tps:.1f}x" if ours else ""))
    hf = None
    cleanup()


# ----------------------------------------------------------------------------------------------------------

SECTIONS = {1: ("decode, short prompt", section_1), 2: ("movie: Q-Former + 11,970-token prompt", section_2),
            3: ("64K-token prompt", section_3), 4: ("int8 / int4", section_4), 5: ("EVA-g vs timm", section_5),
            6: ("Q-Former, short video", section_6), 7: ("training steps", section_7),
            8: ("HF transformers anchor", section_8), 9: ("LoRA with int4 base weights", section_9),
            10: ("an hour of video to the first token", section_10)}


def main():
    global ARGS, S
    p = ArgumentParser(description=__doc__)
    p.add_argument("--only", default="", help="comma-separated sections to run, e.g. 1,4 (default: all)")
    p.add_argument("--out", default="", help="also write the results as JSON here (rewritten after every section)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs and shapes: a smoke test that runs on a CPU")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA, off for CPU")
    p.add_argument("--movie-only", action="store_true",
                   help="sections 2 and 4: only the movie's Q-Former, prefill and memory (no decode-speed rows)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds; sections (and compiles) that would not fit in what is left are skipped")
    p.add_argument("--train-data", default="", metavar="DIR",
                   help="write the synthetic training set of config/random7b.py to DIR (once) and exit")
    ARGS = p.parse_args()
    if ARGS.train_data:
        print(f"training data in {write_train_data(ARGS.train_data)}")
        return
    ARGS.compile = ARGS.compile == "on" or (ARGS.compile == "auto" and ARGS.device.startswith("cuda"))
    S = TINY if ARGS.tiny else REAL
    if ARGS.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here: run with --device cpu (and --tiny)")
    try:
        only = [int(s) for s in ARGS.only.split(",") if s.strip()] or RUN_ORDER
    except ValueError:
        p.error(f"--only takes section numbers 1-10 separated by commas, not {ARGS.only!r}")
    if any(s not in SECTIONS for s in only):
        p.error(f"--only: sections are 1-10, got {ARGS.only!r}")

    torch.set_float32_matmul_precision("high")
    # every section compiles its own model once, at static shapes: no dynamic-shape recompiles, room for all of them
    torch._dynamo.config.automatic_dynamic_shapes = False
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    log(f"bench on {header()['device']}, torch {torch.__version__}, {header()['mode']}, compile "
        f"{'on' if ARGS.compile else 'off'}, sections {only}, budget {ARGS.budget:.0f} s")
    for sec in [s for s in RUN_ORDER if s in only]:
        name, fn = SECTIONS[sec]
        expected = EXPECTED_S[sec] if not ARGS.tiny else 0
        if time_left() < expected / 2:
            skip_row(sec, name, f"time budget ({time_left():.0f} s left, about {expected} s needed; run --only {sec})")
            continue
        log(f"section {sec}: {name}")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failure outside any measurement: record it, go on
            traceback.print_exc()
            ROWS.append(dict(section=str(sec), name=f"{name} (setup)", value=None, unit="", note="",
                             error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"))
        cleanup(dynamo=True)
        save()
        if is_cuda():
            log(f"section {sec} done; {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated")
    head = header()
    print(f"\n## bench.py: {head['device']}, torch {head['torch']}, {head['mode']}, bf16, "
          f"{head['elapsed_s']:.0f} s\n", flush=True)
    print(table(), flush=True)
    save()


S = REAL
if __name__ == "__main__":
    main()
