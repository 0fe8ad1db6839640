"""One training loop for every LLaMA-VID stage: `python train.py config/stage2.py --key=value` on one process,
or `torchrun --nproc_per_node=N train.py config/stage2.py` with FSDP2 (also across nodes)."""
import ast
import ctypes
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from checkpoint import (LATEST, TOKENIZER_FILES, TRAIN_STATE, checkpoint_dir, find_bert_vocab, install, is_hub_id,
                        latest_checkpoint, read_train_state, write_checkpoint, write_model_files)
from data import LLaVADataset, Tokenizer, collate, length_grouped_order
from lora import LoRAConfig, apply_lora, load_adapters, merged_state_dict, quantize_base, save_adapters
from model import LLaMA, LlamaVID, LlamaVIDConfig, LLaMAConfig, peak_flops, training_flops
from tokens import QFormerConfig, TokenConfig, VisualTokenizer, WordPiece, bert_num_heads
from vision import EVAConfig, EVAViT


@dataclass
class Config:
    """Every setting, with its default (the stage-2 video recipe); a config file and --key=value override them."""
    # what trains, from where
    stage: int = 2                   # 1 align, 2 instruct, 3 long video: decides what trains (TRAINABLE)
    template: str = "imgsp_v1"       # conversation template: plain_guided (stage 1), imgsp_v1, vicuna_v1
    data_path: str = ""              # LLaVA-format JSON
    image_folder: str = ""
    video_folder: str = ""
    init_from: str = ""              # a LLaMA-VID checkpoint directory (stages 2, 3); "scratch" = a random model
    llm_path: str = ""               # stage 1: the Vicuna directory
    vision_path: str = ""            # eva_vit_g.pth (stage 1, or when the checkpoint lacks it)
    qformer_path: str = ""           # stage 1: instruct_blip_vicuna7b_trimmed.pth
    bert_path: str = ""              # bert-base-uncased vocab.txt (or its folder)
    tokenizer_dir: str = ""          # where tokenizer.model is, for a scratch model
    # a scratch model's shapes: fields of model.LLaMAConfig, vision.EVAConfig, tokens.TokenConfig ({} = the
    # real model's: Vicuna-7B, EVA-ViT-g/14, the BERT-base Q-Former with 32 queries)
    llm_config: dict = field(default_factory=dict)
    vision_config: dict = field(default_factory=dict)
    token_config: dict = field(default_factory=dict)   # its "qformer": fields of tokens.QFormerConfig
    # what the model sees
    image_size: int = 224
    compress_type: str | None = "mean"  # content tokens a frame: "mean", "grid:g" or None (every patch)
    bert_type: str = "qformer_pretrain"
    video_fps: float = 1.0
    max_frames: int = 0              # 0 = no cap
    video_token: int = 2             # placeholders a frame in the long-video prompt (stage 3)
    max_len: int = 2048
    cache_videos: bool = False       # keep decoded clips in memory after their first read (small synthetic sets)
    out_dir: str = "out/run"
    resume: bool = True              # continue from out_dir's latest checkpoint when there is one
    # LoRA (the original's lora_enable / bits): adapters on the LLM's projections, base weights frozen
    lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_base_quant: str = ""        # "", "bf16", "int8" or "int4": how the frozen base weights are held (QLoRA)
    lora_save_merged: bool = False   # also write a merged full checkpoint (float bases only)
    # optimisation
    learning_rate: float = 2e-5
    min_lr: float = 0.0
    visual_learning_rate: float = 0.0  # the visual token generator's rate (LLaVA's mm_projector_lr); 0 = learning_rate
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"      # after the warm-up: "cosine" to min_lr, or "wsd": constant, then linear to min_lr
    cooldown_ratio: float = 0.2      # (wsd) the share of the steps, at the end, over which the rate falls to min_lr
    epochs: int = 1
    max_steps: int = 0               # 0 = run the epochs
    global_batch_size: int = 128     # kept when the GPU count changes: accumulation absorbs the difference
    micro_batch_size: int = 4
    grad_clip: float = 1.0
    dropout: float = 0.1             # the Q-Former's (BERT's), active while it is in train mode as in the original
    dtype: str = "bfloat16"          # compute dtype; master weights, optimizer state and reductions stay float32
    gradient_checkpointing: bool = True
    compile: bool = False            # torch.compile each LLM block (one graph shared by all): fused norms, rope, ...
    group_by_length: bool = True
    seed: int = 42
    num_workers: int = 2             # DataLoader processes decoding the media
    device: str = "auto"
    # logging and saving
    log_interval: int = 1            # a logged step is timed: the device is synchronised between its phases
    save_interval: int = 1000        # steps; a final checkpoint is written too
    save_checkpoints: bool = True    # False: measure only (benchmark runs)
    max_shard_size: str = "10GB"     # weight shards of at most this much (transformers' default), or bytes
    wandb_log: bool = False
    wandb_project: str = "llama-vid"
    wandb_run_name: str = "run"


def get_config(argv) -> Config:
    """nanoGPT's configurator: config files are exec'd into a namespace seeded with the defaults (a file may define
    helper names of its own), --key=value arguments set a setting (a Python literal, else a plain string)."""
    ns = dataclasses.asdict(Config())
    names = list(ns)
    for arg in argv:
        if not arg.startswith("--"):
            if not Path(arg).is_file():
                raise FileNotFoundError(f"config file {arg} does not exist")
            exec(Path(arg).read_text(), ns)
            continue
        key, _, value = arg[2:].partition("=")
        if key not in names:
            raise ValueError(f"unknown setting --{key}; see the Config defaults at the top of train.py")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        ns[key] = value
    c = Config(**{k: ns[k] for k in names})
    for key, allowed in (("stage", (1, 2, 3)), ("lr_schedule", ("cosine", "wsd")),
                         ("dtype", ("bfloat16", "float16", "float32"))):
        if getattr(c, key) not in allowed:
            raise ValueError(f"{key} {getattr(c, key)!r} is not one of {', '.join(map(repr, allowed))}")
    return c


# which parts train in each stage (the original's recipe); EVA never trains
TRAINABLE = {
    1: ("visual.mm_projector", "visual.vlm_att_projector", "visual.vlm_att_key_projector",
        "visual.vlm_att_val_projector"),
    2: ("llm.", "visual."),
    3: ("llm.", "visual.mm_projector"),
}


def lr_at(step, total, c):
    """The rate at a step: a linear warm-up, then a cosine to min_lr, or (wsd: warm-up, stable, decay) the full
    rate until the last cooldown_ratio of the steps, over which it falls linearly to min_lr."""
    lr, min_lr = c.learning_rate, c.min_lr
    warmup = math.ceil(c.warmup_ratio * total)
    if step < warmup:
        return lr * (step + 1) / warmup
    if c.lr_schedule == "wsd":
        cooldown = math.ceil(c.cooldown_ratio * total)
        return lr if step < total - cooldown else min_lr + (lr - min_lr) * (total - step) / cooldown
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------
# setup: processes, device, seed

@dataclass
class Process:
    """Where this process trains: its rank of `world` processes, its device, its compute dtype."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        """Compute in dtype: one process autocasts; under FSDP its mixed-precision policy casts."""
        if self.world == 1 and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return nullcontext()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup(c) -> Process:
    """Under torchrun, join the process group; pick the device; seed this process's generator."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():  # (once a process: a script may call main several times)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    else:
        rank, world = 0, 1
        dev = torch.device(c.device if c.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(c.seed + rank)
    if c.global_batch_size % (c.micro_batch_size * world):
        raise ValueError(f"global_batch_size {c.global_batch_size} is not a multiple of micro_batch_size x "
                         f"processes = {c.micro_batch_size * world}")
    # bf16 autocast on a CPU is slow and buys nothing here
    return Process(rank, world, dev, torch.float32 if dev.type == "cpu" else getattr(torch, c.dtype))


def keep_freed_memory():
    """On a CPU, glibc's malloc returns every large freed block (activations, gradients) to the OS at once, and
    the next step faults the same memory back in page by page. Serve blocks up to 32 MiB from the heap and keep
    its free top instead (no effect where libc is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's largest allowed value)
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def find_resume(c, p):
    """(checkpoint, its train state) that this run continues from, or (None, {}) for a fresh start."""
    out = Path(c.out_dir)
    found = latest_checkpoint(out) if c.resume else None
    if found is None:
        if p.rank == 0 and c.save_checkpoints and (out / LATEST).exists():
            (out / LATEST).unlink()  # a fresh start: an earlier run's checkpoints are never resumed from now on
        return None, {}
    ckpt, step = found
    state = read_train_state(ckpt / TRAIN_STATE)  # before anything else is built from the directory
    if state["step"] != step:
        raise ValueError(f"{ckpt / TRAIN_STATE} is at step {state['step']}, not {step}: the checkpoint was altered; "
                         "start afresh with --resume=False")
    return ckpt, state


# ----------------------------------------------------------------------------------------------------------
# build: the model a stage starts from, its trainable parts, LoRA, FSDP

def build(c, p, ckpt):
    """(model, tokenizer, files every checkpoint carries beside the weights, LoRA config or None)."""
    # a resumed run rebuilds from its own last checkpoint (a LoRA run: its base, then its adapters)
    init_from = str(ckpt) if ckpt is not None and not c.lora else c.init_from
    named = init_from if init_from not in ("", "scratch") else c.llm_path or c.tokenizer_dir
    source = checkpoint_dir(named)  # a Hugging Face Hub id works too: a released checkpoint to fine-tune
    vocab = find_bert_vocab(source, c.bert_path or None, download=is_hub_id(named))
    tokenizer = Tokenizer(source)
    # read now: a resumed run's source is a checkpoint that its next save removes
    files = {n: (source / n).read_bytes() for n in TOKENIZER_FILES if (source / n).is_file()}
    files["vocab.txt"] = Path(vocab).read_bytes()
    model = build_model(c, init_from, p.device, vocab)
    set_trainable(model, c.stage)
    lora_cfg = None
    if c.lora:
        lora_cfg = LoRAConfig(r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout)
        apply_lora(model, lora_cfg)  # freezes the LLM; the visual parts keep the stage's choice
        if ckpt is not None:
            load_adapters(model, ckpt, merge=False)
        if c.lora_base_quant:
            quantize_base(model, c.lora_base_quant)
        model.to(p.device)
    if p.rank == 0:
        n_train = sum(q.numel() for q in model.parameters() if q.requires_grad)
        print(f"stage {c.stage}: {n_train / 1e6:.2f}M trainable of "
              f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters; {p.world} process(es), "
              f"micro batch {c.micro_batch_size}, accumulation {c.global_batch_size // (c.micro_batch_size * p.world)}")
    model.llm.gradient_checkpointing = c.gradient_checkpointing
    if c.compile:
        for block in model.llm.layers:  # regional compilation: compiled once, reused by every layer
            block.compile()
    model.visual.set_dropout(c.dropout)
    if p.world > 1:
        mp = MixedPrecisionPolicy(param_dtype=p.dtype, reduce_dtype=torch.float32)
        for block in model.llm.layers:
            fully_shard(block, mp_policy=mp)
        # EVA is frozen and runs a different number of times on each process (not at all for a text-only batch):
        # it stays out of FSDP, replicated in the compute dtype. The token generator sits in the root group,
        # gathered once per forward however often it runs.
        frozen = set()
        if model.vision is not None:
            model.vision.to(p.dtype)
            frozen = set(model.vision.parameters()) | set(model.vision.buffers())
        fully_shard(model, mp_policy=mp, ignored_params=frozen)
    return model, tokenizer, files, lora_cfg


def build_model(c, init_from, device, vocab):
    """The model a stage starts from, with float32 master weights: a LLaMA-VID checkpoint, a random model of the
    config's shapes (init_from="scratch"), or (stage 1) Vicuna, EVA and InstructBLIP's Q-Former."""
    if init_from not in ("", "scratch"):
        model = LlamaVID.from_pretrained(init_from, vision_path=c.vision_path or None, bert_path=c.bert_path or None)
        # into config.json: the checkpoint then loads without the BERT config.json the count came from
        model.config.qformer_num_heads = model.visual.cfg.qformer.num_heads
        if c.stage == 3:  # stretch RoPE linearly so max_len fits (the original's rule)
            old = (model.llm.cfg.rope_scaling or {}).get("factor", 1.0)
            factor = float(math.ceil(c.max_len / (model.llm.cfg.max_seq_len * old)))
            if factor > 1:
                model.llm.cfg.rope_scaling = {"type": "linear", "factor": factor * old}
            model.config.max_length, model.config.video_token = c.max_len, c.video_token
        return model.float().to(device)
    if not init_from and c.stage != 1:
        raise ValueError(f"stage {c.stage} starts from a checkpoint: set init_from")
    if init_from == "scratch":
        with torch.device(device):  # initialised where it will run: a 7B model is never built on the CPU
            llm = LLaMA(LLaMAConfig(**c.llm_config))
            # token embeddings ~ N(0, 0.02) as HF initialises a LLaMA (initializer_range); torch's N(0, 1)
            # makes text tokens ~50x the size of what the fresh projectors emit, and the video gets ignored
            torch.nn.init.normal_(llm.tok_embeddings.weight, std=0.02)
            vision = EVAViT(EVAConfig(**c.vision_config)).requires_grad_(False)
            llm.inv_freq = llm._inv_freq(device)
        tok = dict(c.token_config)
        qcfg = dict(tok.pop("qformer", {}))
        qcfg.setdefault("vocab_size", len(WordPiece(vocab)))  # the given vocabulary, "[DEC]" included
        qcfg.setdefault("num_heads", bert_num_heads(vocab, qcfg.get("hidden_size", 768)))  # its config.json
        qcfg = QFormerConfig(**{**qcfg, "vision_width": vision.cfg.width})
        tcfg = TokenConfig(**{**tok, "llm_dim": llm.cfg.dim, "vision_width": vision.cfg.width, "qformer": qcfg,
                              "compress_type": c.compress_type, "bert_type": c.bert_type})
        with torch.device(device):
            visual = VisualTokenizer(tcfg)
    else:
        llm = LLaMA.from_pretrained(c.llm_path)
        vision = EVAViT.from_lavis(c.vision_path, img_size=c.image_size)
        tcfg = TokenConfig(llm_dim=llm.cfg.dim, vision_width=vision.cfg.width, compress_type=c.compress_type,
                           bert_type=c.bert_type)
        visual = VisualTokenizer.from_instructblip(c.qformer_path, tcfg)
    visual.set_wordpiece(vocab)
    config = LlamaVIDConfig(
        llm=llm.cfg, mm_hidden_size=vision.cfg.width, image_size=c.image_size, patch_size=vision.cfg.patch_size,
        video_token=c.video_token, compress_type=c.compress_type, bert_type=c.bert_type,
        num_query=visual.cfg.num_query, projector_type=visual.cfg.projector_type,
        qformer_num_heads=visual.cfg.qformer.num_heads, max_length=c.max_len,
        vision_tower=c.vision_path or LlamaVIDConfig.vision_tower,
        extra={"max_token": c.max_len, "torch_dtype": "float32"})
    return LlamaVID(llm, vision, visual, config).float().to(device)


def set_trainable(model, stage):
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE[stage]))


# ----------------------------------------------------------------------------------------------------------
# data: the dataset, its order, this process's batches

def load_data(c, p, model, tokenizer, start_step):
    """(an iterator over this process's micro batches from global step start_step on, the run's total steps)."""
    data = LLaVADataset(c.data_path, tokenizer, c.template, c.image_folder, c.video_folder,
                        image_size=model.image_size, video_fps=c.video_fps, max_frames=c.max_frames or None,
                        video_token=c.video_token, max_len=c.max_len, seed=c.seed, cache_videos=c.cache_videos)
    lengths = data.modality_lengths()
    B, mb = c.global_batch_size, c.micro_batch_size
    steps_per_epoch = len(data) // B
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} samples do not fill one global batch of {B}")
    total = c.max_steps or steps_per_epoch * c.epochs
    if c.cache_videos and total >= steps_per_epoch:  # a run that reads the whole set: decode it all now
        t0 = time.time()
        n_read = data.fill_cache()
        if p.rank == 0 and n_read:
            print(f"{n_read} videos decoded into memory in {time.time() - t0:.1f} s")
        if model.vision is not None and p.world == 1:  # EVA never trains: keep its features, not the frames
            model.vision.eval()
            with p.autocast():
                data.encode_cache(lambda pixels: model.encode(pixels.to(p.device)))

    def order(epoch):
        if c.group_by_length:  # micro batches of similar lengths, whatever the process count
            return length_grouped_order(lengths, mb, c.seed + epoch)
        return torch.randperm(len(data), generator=torch.Generator().manual_seed(c.seed + epoch)).tolist()

    def batches():
        """A step's global batch is cut into the same micro batches on any number of processes; rank r takes
        every world-th one, so 1 GPU with accumulation and N GPUs compute the same loss and gradient."""
        epoch, s = divmod(start_step, steps_per_epoch)
        while True:
            samples = order(epoch)
            for st in range(s, steps_per_epoch):
                step_samples = samples[st * B:(st + 1) * B]
                for j in range(p.rank, B // mb, p.world):
                    yield step_samples[j * mb:(j + 1) * mb]
            epoch, s = epoch + 1, 0

    loader = torch.utils.data.DataLoader(IndexBatches(data, batches()), batch_size=None,
                                         num_workers=c.num_workers, collate_fn=collate, persistent_workers=False)
    return iter(loader), total  # (iter draws the workers' seeds from the RNG: a resume restores the RNG after it)


class IndexBatches(torch.utils.data.IterableDataset):
    """Turns the stream of index lists into dataset items, in worker processes when num_workers > 0."""

    def __init__(self, data, index_batches):
        self.data, self.index_batches = data, index_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for k, indices in enumerate(self.index_batches):
            if info is None or k % info.num_workers == info.id:
                yield [self.data[i] for i in indices]


def blank_batch(tokenizer):
    """A one-token text batch with no supervised label: its loss is 0 and so are its gradients."""
    ids = torch.tensor([[tokenizer.bos_id, tokenizer.bos_id]])
    return {"input_ids": ids, "labels": torch.full_like(ids, -100), "attention_mask": torch.ones_like(ids),
            "media": [None], "prompts": [[]], "skipped": 0}


# ----------------------------------------------------------------------------------------------------------
# optimizer and resume

def make_optimizer(c, p, model):
    """AdamW in two groups, so that the visual token generator may train at its own rate; returns (optimizer,
    each group's rate relative to learning_rate)."""
    params = [(name, q) for name, q in model.named_parameters() if q.requires_grad]  # (FSDP's DTensors by now)
    groups = [[q for name, q in params if not name.startswith("visual.")],
              [q for name, q in params if name.startswith("visual.")]]
    visual_scale = (c.visual_learning_rate or c.learning_rate) / (c.learning_rate or 1.0)
    scales = [scale for scale, group in zip((1.0, visual_scale), groups) if group]
    optimizer = torch.optim.AdamW([{"params": group} for group in groups if group], lr=c.learning_rate,
                                  betas=tuple(c.betas), weight_decay=c.weight_decay,
                                  fused=p.device.type == "cuda" or p.world == 1)  # (CPU too: 5x a loop's speed)
    return optimizer, scales


def resume(p, model, optimizer, ckpt, train_state):
    """Continue where the checkpoint stopped: its optimizer state, this process's RNG, and the top of out_dir as
    its save left it (had a kill cut that save short)."""
    wrong = (f"{ckpt / TRAIN_STATE}: its optimizer state does not fit this run's trainable parameters{{}}; resume "
             "with the settings it was written with, or start afresh with --resume=False or another out_dir")
    state = train_state["optimizer"]
    if p.world > 1:
        names = {id(q): n for n, q in model.named_parameters()}
        if [g["params"] for g in state["param_groups"]] != \
                [[names[id(q)] for q in g["params"]] for g in optimizer.param_groups]:
            raise ValueError(wrong.format(""))
        # not strict: a parameter that never had a gradient (the Q-Former's last text layer) has no state,
        # in the run that saved it as in this one
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        try:
            optimizer.load_state_dict(state)
        except ValueError as e:  # e.g. written with other trainable parts
            raise ValueError(wrong.format(f" ({e})")) from None
    own = p.rank if p.rank < len(train_state["rng_cpu"]) else 0  # (another process count cannot be exact anyway)
    torch.set_rng_state(train_state["rng_cpu"][own])
    if p.device.type == "cuda" and train_state["rng_cuda"][own] is not None:
        torch.cuda.set_rng_state(train_state["rng_cuda"][own])
    if p.rank == 0:
        print(f"resumed from {ckpt} at step {train_state['step']}")
        install(ckpt)


# ----------------------------------------------------------------------------------------------------------

def main(argv, return_model=False):
    """Train as argv says; returns the losses of the steps run (and the model, with return_model)."""
    c = get_config(argv)
    p = setup(c)
    ckpt, train_state = find_resume(c, p)
    step = train_state.get("step", 0)
    model, tokenizer, files, lora_cfg = build(c, p, ckpt)
    batches, total = load_data(c, p, model, tokenizer, step)
    optimizer, scales = make_optimizer(c, p, model)
    if ckpt is not None:
        resume(p, model, optimizer, ckpt, train_state)

    def save(step, losses):
        save_checkpoint(c, p, model, optimizer, step, losses, files, lora_cfg)
    losses = train(c, p, model, optimizer, scales, batches, tokenizer, step, total, save)
    if p.rank == 0:
        print(f"done: {total} steps, final loss {losses[-1] if losses else float('nan'):.4f}"
              + (f", checkpoint in {c.out_dir}" if c.save_checkpoints else ""))
    if p.world > 1:
        dist.barrier()  # every process returns once process 0 has written the checkpoint (a next stage reads it)
    return (losses, model) if return_model else losses


def train(c, p, model, optimizer, scales, batches, tokenizer, step, total, save):
    """The loop, from step to total. A logged step is timed: the device is synchronised between its phases
    (waiting for the loader, forward + backward, optimizer), which other steps leave overlapped."""
    wandb = start_wandb(c) if c.wandb_log and p.rank == 0 else None
    accum = c.global_batch_size // (c.micro_batch_size * p.world)
    params = [q for q in model.parameters() if q.requires_grad]
    peak = peak_flops(p.device)
    bar = tqdm(total=total, initial=step, disable=p.rank != 0, desc=f"stage {c.stage}", file=sys.stderr)
    model.train()
    if model.vision is not None:
        model.vision.eval()  # frozen and without dropout
    losses, skipped, tokens, flops, t_log = [], 0, 0, 0.0, time.perf_counter()
    while step < total:
        timed = (step + 1) % c.log_interval == 0
        lr = lr_at(step, total, c)
        for group, scale in zip(optimizer.param_groups, scales):
            group["lr"] = lr * scale
        t_data = t_eva = t_model = 0.0
        step_loss = torch.zeros((), device=p.device)
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            t_data += time.perf_counter() - t0
            skipped += batch["skipped"]
            if "input_ids" not in batch:  # every sample of this micro batch was unreadable
                if p.world == 1:
                    continue
                batch = blank_batch(tokenizer)  # the other processes wait for this one's collectives
            t0 = time.perf_counter()
            media = [m.to(p.device) if m is not None else None for m in batch["media"]]
            with torch.no_grad(), p.autocast():  # the frozen EVA first, so that its time shows apart
                media = model.encode_media(media)
            if timed:
                p.sync()
            t_eva += time.perf_counter() - t0
            t0 = time.perf_counter()
            with p.autocast():
                logits, loss = model(batch["input_ids"].to(p.device), media, batch["prompts"],
                                     attention_mask=batch["attention_mask"].to(p.device),
                                     labels=batch["labels"].to(p.device))
            (loss / accum).backward()
            step_loss += loss.detach() / accum
            n, seq_len = logits.shape[0] * logits.shape[1] * p.world, logits.shape[1]  # visual tokens included
            tokens, flops = tokens + n, flops + training_flops(model.llm, n, seq_len)
            del logits
            if timed:
                p.sync()
            t_model += time.perf_counter() - t0
        t0 = time.perf_counter()
        if p.world > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss.item())  # (waits for the device)
        t_optim = time.perf_counter() - t0
        step += 1
        bar.update(1)
        if p.rank == 0 and step % c.log_interval == 0:
            dt = time.perf_counter() - t_log
            msg = {"step": step, "loss": round(losses[-1], 4), "lr": lr, "data_ms": round(1e3 * t_data, 1),
                   "eva_ms": round(1e3 * t_eva, 1), "fwd_bwd_ms": round(1e3 * t_model, 1),
                   "optim_ms": round(1e3 * t_optim, 1),
                   "tokens/s": round(tokens / dt)}
            if peak:
                msg["mfu"] = round(flops / dt / (peak * p.world), 4)
            if p.device.type == "cuda":
                msg["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(p.device) / 2**30, 2)
            bar.write(json.dumps(msg))
            if wandb is not None:
                wandb.log(msg)
            t_log, tokens, flops = time.perf_counter(), 0, 0.0
        if c.save_checkpoints and (step % c.save_interval == 0 or step == total):
            t0 = time.perf_counter()
            save(step, losses)
            t_log += time.perf_counter() - t0  # a save's time is not the training's
    bar.close()
    skipped = torch.tensor([skipped], device=p.device)
    if p.world > 1:
        dist.all_reduce(skipped)
    if p.rank == 0 and skipped.item():
        print(f"{int(skipped.item())} unreadable sample(s) were skipped (see the warnings above)")
    return losses


def start_wandb(c):
    try:
        import wandb
    except ImportError:
        raise ValueError("wandb_log=True needs wandb: pip install wandb") from None
    wandb.init(project=c.wandb_project, name=c.wandb_run_name, config=dataclasses.asdict(c))
    return wandb


# ----------------------------------------------------------------------------------------------------------
# save: gather the state (every process), write it (process 0)

def save_checkpoint(c, p, model, optimizer, step, losses, files, lora_cfg=None):
    """out_dir/checkpoint-{step}, whole, in the original's layout, and its model files at the top of out_dir
    (checkpoint.write_checkpoint). Every process takes part in gathering the sharded state; process 0 writes."""
    rngs = [(torch.get_rng_state(), torch.cuda.get_rng_state() if p.device.type == "cuda" else None)]
    if p.world > 1:  # every process draws its own dropout masks: keep each one's generator
        rngs = rngs * p.world
        dist.all_gather_object(rngs, rngs[p.rank])
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=full)
        optim = get_optimizer_state_dict(model, optimizer, options=full)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        optim = optimizer.state_dict()
    if p.rank != 0:
        return
    settings = {k: v for k, v in dataclasses.asdict(c).items() if isinstance(v, (int, float, str, bool, type(None)))}
    train_state = {"rng_cpu": [r[0] for r in rngs], "rng_cuda": [r[1] for r in rngs], "losses": losses,
                   "step": step, "optimizer": optim, "config": settings}

    def write_model(folder):
        weights = state
        if lora_cfg is not None:  # peft's layout; full weights only when asked for, merged
            save_adapters(model, folder, lora_cfg, state=state, base_model=c.init_from or c.llm_path)
            weights = merged_state_dict(model, state) if c.lora_save_merged else None
        write_model_files(folder, model, weights, files, c.max_shard_size, projector_file=c.stage == 1)
    write_checkpoint(c.out_dir, step, train_state, write_model)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        if dist.is_initialized():
            dist.destroy_process_group()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
