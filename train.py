"""One training loop for every LLaMA-VID stage: `python train.py config/stage2.py --key=value` on one process,
or `torchrun --nproc_per_node=N train.py config/stage2.py` with FSDP2 (also across nodes)."""
import ast
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------
# defaults (the stage-2 video recipe); a config file and --key=value arguments override them
stage = 2                    # 1 align, 2 instruct, 3 long video: decides what trains (trainable_parts)
template = "imgsp_v1"        # conversation template: plain_guided (stage 1), imgsp_v1, vicuna_v1
data_path = ""               # LLaVA-format JSON
image_folder = ""
video_folder = ""
init_from = ""               # a LLaMA-VID checkpoint directory (stages 2, 3, resumed runs); "scratch" = random
llm_path = ""                # stage 1: the Vicuna directory
vision_path = ""             # eva_vit_g.pth (stage 1, or when the checkpoint lacks it)
qformer_path = ""            # stage 1: instruct_blip_vicuna7b_trimmed.pth
bert_path = ""               # bert-base-uncased vocab.txt (or its folder)
tokenizer_dir = ""           # where tokenizer.model is, for a scratch model
image_size = 224
compress_type = "mean"       # "mean", "grid:g" or None
bert_type = "qformer_pretrain"
num_query = 32
video_fps = 1.0
max_frames = 0               # 0 = no cap
video_token = 2
max_len = 2048
cache_videos = False         # keep decoded clips in memory after their first read (small synthetic sets only)
out_dir = "out/run"
resume = True                # continue from out_dir/train_state.pt when it exists
stages = ()                  # several stages in one command, e.g. (1, 2) (config/shapes.py): see run_stages
stage_overrides = {}         # {stage: {key: value}} for run_stages: over the config file, under --key=value
shapes_dataset = {}          # shapes.make_shapes_dataset arguments: that synthetic data is written first (once)
# LoRA (the original's lora_enable / bits): adapters on the LLM's projections, base weights frozen
lora = False
lora_r = 64
lora_alpha = 16
lora_dropout = 0.05
lora_base_quant = ""         # "", "bf16", "int8" or "int4": how the frozen base weights are held (QLoRA-style)
lora_save_merged = False     # also write a merged full checkpoint (float bases only)
# optimisation
learning_rate = 2e-5
min_lr = 0.0
visual_learning_rate = 0.0   # the visual token generator's rate (LLaVA's mm_projector_lr); 0 = learning_rate
weight_decay = 0.0
betas = (0.9, 0.999)
warmup_ratio = 0.03
lr_schedule = "cosine"       # after the warm-up: "cosine" to min_lr, or "wsd": constant, then a linear cool-down
cooldown_ratio = 0.2         # (wsd) the share of the steps, at the end, over which the rate falls to min_lr
epochs = 1
max_steps = 0                # 0 = run the epochs
global_batch_size = 128      # kept when the GPU count changes: accumulation absorbs the difference
micro_batch_size = 4
grad_clip = 1.0
dropout = 0.1                # the Q-Former's (BERT's) dropout, active while it is in train mode as in the original
dtype = "bfloat16"           # compute dtype; master weights, optimizer state and reductions stay float32
gradient_checkpointing = True
compile = False              # torch.compile each LLM block (one graph shared by all): fused norms, rope, activations
group_by_length = True
seed = 42
num_workers = 2
device = "auto"
# logging and saving
log_interval = 1
save_interval = 1000         # steps; a final checkpoint is written too
save_checkpoints = True      # False: measure only (benchmark runs)
max_shard_size = "10GB"      # weight shards of at most this much (transformers' save_pretrained default), or bytes
wandb_log = False
wandb_project = "llama-vid"
wandb_run_name = "run"
# ----------------------------------------------------------------------------------------------------------


def apply_overrides(argv, namespace):
    """nanoGPT's configurator: python files are exec'd into the defaults, then --key=value pairs override."""
    for arg in argv:
        if not arg.startswith("--"):
            if not Path(arg).is_file():
                raise FileNotFoundError(f"config file {arg} does not exist")
            exec(Path(arg).read_text(), namespace)
            continue
        key, _, value = arg[2:].partition("=")
        if key not in namespace or key.startswith("_"):
            raise ValueError(f"unknown setting --{key}; see the defaults at the top of train.py")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        namespace[key] = value


# which parts train in each stage (SPEC: Training recipe); EVA never trains
TRAINABLE = {
    1: ("visual.mm_projector", "visual.vlm_att_projector", "visual.vlm_att_key_projector",
        "visual.vlm_att_val_projector"),
    2: ("llm.", "visual."),
    3: ("llm.", "visual.mm_projector"),
}


def set_trainable(model, stage):
    prefixes = TRAINABLE[stage]
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    return [p for p in model.parameters() if p.requires_grad]


def build_model(cfg, device, vocab=None):
    """The model a stage starts from, with float32 master weights."""
    from model import LLaMA, LlamaVID, LlamaVIDConfig, LLaMAConfig
    from tokens import QFormerConfig, TokenConfig, VisualTokenizer, WordPiece, bert_num_heads
    from vision import EVAConfig, EVAViT
    if cfg["init_from"] == "scratch" or (cfg["stage"] == 1 and not cfg["init_from"]):
        if cfg["init_from"] == "scratch":  # a random model of the shapes the config gives (tiny runs, benchmarks)
            with torch.device(device):  # initialised where it will run: a 7B model is never built on the CPU
                llm = LLaMA(LLaMAConfig(**(cfg["llm_config"] or {})))
                # token embeddings ~ N(0, 0.02) as HF initialises a LLaMA (initializer_range); torch's N(0, 1)
                # makes text tokens ~50x the size of what the fresh projectors emit, and the video gets ignored
                torch.nn.init.normal_(llm.tok_embeddings.weight, std=0.02)
                vision = EVAViT(EVAConfig(**(cfg["vision_config"] or {}))).requires_grad_(False)
                llm.inv_freq = llm._inv_freq(device)
            tok = dict(cfg["token_config"] or {})
            qcfg = dict(tok.pop("qformer", {}))
            qcfg.setdefault("vocab_size", len(WordPiece(vocab)))  # the given vocabulary, "[DEC]" included
            qcfg.setdefault("num_heads", bert_num_heads(vocab, qcfg.get("hidden_size", 768)))  # its config.json
            qcfg = QFormerConfig(**{**qcfg, "vision_width": vision.cfg.width})
            tcfg = TokenConfig(**{**tok, "llm_dim": llm.cfg.dim, "vision_width": vision.cfg.width, "qformer": qcfg,
                                  "compress_type": cfg["compress_type"], "bert_type": cfg["bert_type"]})
            with torch.device(device):
                visual = VisualTokenizer(tcfg)
        else:
            llm = LLaMA.from_pretrained(cfg["llm_path"])
            vision = EVAViT.from_lavis(cfg["vision_path"], img_size=cfg["image_size"])
            tcfg = TokenConfig(llm_dim=llm.cfg.dim, vision_width=vision.cfg.width,
                               compress_type=cfg["compress_type"], bert_type=cfg["bert_type"])
            visual = VisualTokenizer.from_instructblip(cfg["qformer_path"], tcfg)
        visual.set_wordpiece(vocab)
        config = LlamaVIDConfig(
            llm=llm.cfg, mm_hidden_size=vision.cfg.width, image_size=cfg["image_size"],
            patch_size=vision.cfg.patch_size, video_token=cfg["video_token"], compress_type=cfg["compress_type"],
            bert_type=cfg["bert_type"], num_query=visual.cfg.num_query, projector_type=visual.cfg.projector_type,
            qformer_num_heads=visual.cfg.qformer.num_heads, max_length=cfg["max_len"],
            vision_tower=cfg["vision_path"] or LlamaVIDConfig.vision_tower,
            extra={"max_token": cfg["max_len"], "torch_dtype": "float32"})
        model = LlamaVID(llm, vision, visual, config)
    else:
        if not cfg["init_from"]:
            raise ValueError(f"stage {cfg['stage']} starts from a checkpoint: set init_from")
        model = LlamaVID.from_pretrained(cfg["init_from"], vision_path=cfg["vision_path"] or None,
                                         bert_path=cfg["bert_path"] or None)
        model.config.qformer_num_heads = model.visual.cfg.qformer.num_heads
        if cfg["stage"] == 3:  # stretch RoPE linearly so max_len fits (the original's rule)
            old = (model.llm.cfg.rope_scaling or {}).get("factor", 1.0)
            factor = float(math.ceil(cfg["max_len"] / (model.llm.cfg.max_seq_len * old)))
            if factor > 1:
                model.llm.cfg.rope_scaling = {"type": "linear", "factor": factor * old}
            model.config.max_length, model.config.video_token = cfg["max_len"], cfg["video_token"]
    return model.float().to(device)


# ----------------------------------------------------------------------------------------------------------
# saving: the original HF layout, in whole checkpoints
#
# out_dir/checkpoint-N/   one whole checkpoint: what transformers 4.31's Trainer writes for these models
#                         (config.json, pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json, the
#                         tokenizer, vocab.txt; stage 1 also mm_projector.bin; LoRA: peft's files) and
#                         train_state.pt (optimizer, RNG, step: tensors and plain data, read with weights_only)
# out_dir/latest          the name of the newest whole checkpoint: the one a resume takes
# out_dir/*               that checkpoint's model files, hard-linked: what sample.py, LlamaVID.from_pretrained
#                         and the original's builder load
#
# A checkpoint is written under checkpoint-N.partial, synced to disk, renamed to checkpoint-N, and only then named
# in `latest` (a rename too): a kill at any moment leaves `latest` naming a whole checkpoint, old or new.

WEIGHTS_INDEX = "pytorch_model.bin.index.json"
TRAIN_STATE = "train_state.pt"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
LATEST = "latest"
# what a save puts at the top of out_dir; a file of these names that the new checkpoint lacks is stale
MODEL_FILES = re.compile(r"pytorch_model.*\.bin|pytorch_model\.bin\.index\.json|model.*\.safetensors(\.index\.json)?|"
                         r"mm_projector\.bin|adapter_model\..*|adapter_config\.json|non_lora_trainables\.bin|"
                         + re.escape(TRAIN_STATE))


def full_state_dict(model, distributed):
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def to_original_keys(state, model):
    """Our parameter names -> the original checkpoint's (what the original code and sample.py load)."""
    from checkpoint import VISION_PREFIX, ours_to_hf
    out = {}
    for k, v in state.items():
        if k.startswith("llm."):
            out[ours_to_hf(k[4:])] = v
        elif k.startswith("vision."):
            # frozen: stored as LAVIS does, in float16, unless that would round it (a scratch model's random
            # EVA): a resumed run must hold the very weights the interrupted one did
            half = v.to(torch.float16)
            out[VISION_PREFIX + k[7:]] = half if torch.equal(half.to(v.dtype), v) else v
    visual = {k[7:]: v for k, v in state.items() if k.startswith("visual.")}
    out.update(model.visual.llamavid_state_dict(visual))
    return out


def parse_size(size) -> int:
    """Bytes from an int or a size as transformers writes it: "10GB" (10**10), "500MiB" (500 * 2**20)."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if m is None:
        raise ValueError(f"max_shard_size {size!r} is not a size: give bytes or e.g. '10GB', '500MB', '2GiB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "KMG".index(unit[0]) * base)


def shard_weights(weights, max_bytes):
    """{file name: tensors} as transformers 4.31 shards a state dict: in order, a new shard whenever the next
    tensor would take the current one past max_bytes (so a larger tensor gets a shard of its own). Unlike 4.31,
    one shard is still named -00001-of-00001 with an index: the original finds its weights through the index."""
    shards, size = [{}], 0
    for k, v in weights.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return {f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin": shard for i, shard in enumerate(shards)}


def save_weights(weights, folder, max_bytes):
    """pytorch_model-0000k-of-0000n.bin (plain dicts of tensors) and pytorch_model.bin.index.json."""
    weight_map = {}
    for name, shard in shard_weights(weights, max_bytes).items():
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_model_files(folder, model, state, cfg, files, lora_cfg=None):
    """The files the original's builder (and ours) loads a model from, written into folder; files: {name: bytes}
    of the tokenizer and the vocabulary."""
    if lora_cfg is not None:  # peft's layout (adapter_config.json, adapter_model.safetensors, non_lora_trainables)
        from lora import merged_state_dict, save_adapters
        save_adapters(model, folder, lora_cfg, state=state, base_model=cfg["init_from"] or cfg["llm_path"])
        state = merged_state_dict(model, state) if cfg["lora_save_merged"] else None
    if state is not None:
        weights = {}
        for k, v in to_original_keys(state, model).items():
            v = v.contiguous()
            # a view (a slice of a fused weight) would be written with the whole storage under it
            weights[k] = v.clone() if v.untyped_storage().nbytes() != v.nbytes else v
        save_weights(weights, folder, parse_size(cfg["max_shard_size"]))
        if cfg["stage"] == 1:  # the trainable parts alone, as the original's mm_projector.bin
            torch.save({k: v for k, v in weights.items() if k.startswith(("model.mm_projector", "model.vlm_att_"))},
                       folder / "mm_projector.bin")
    hf = dict(model.hf_config)
    hf.update(torch_dtype="float32", transformers_version="4.31.0")
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    for name, data in files.items():
        (folder / name).write_bytes(data)


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the files in it are synced already
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def save_checkpoint(model, optimizer, step, cfg, distributed, rank, files, train_state, lora_cfg=None):
    """Write out_dir/checkpoint-{step} whole, point out_dir/latest at it, and put its model files at the top of
    out_dir (see the layout above). Every process takes part in gathering the state; process 0 writes."""
    state = full_state_dict(model, distributed)
    optim = None
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
    elif optimizer is not None:
        optim = optimizer.state_dict()
    if rank != 0:
        return
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step}"
    staging, ckpt = out / f"{name}.partial", out / name
    if staging.exists():  # left by a killed save
        shutil.rmtree(staging)
    staging.mkdir()
    write_model_files(staging, model, state, cfg, files, lora_cfg)
    plain = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, type(None)))}
    torch.save(dict(train_state, step=step, optimizer=optim, config=plain), staging / TRAIN_STATE)
    for f in staging.iterdir():
        fsync(f)
    fsync(staging)
    if ckpt.exists():  # an earlier run's, which `latest` no longer names (a fresh start unlinks it)
        shutil.rmtree(ckpt)
    os.rename(staging, ckpt)
    fsync(out)
    pointer = out / f"{LATEST}.tmp"
    pointer.write_text(name + "\n")
    fsync(pointer)
    os.replace(pointer, out / LATEST)  # the switch: from here on a resume takes this checkpoint
    fsync(out)
    install(ckpt)


def latest_checkpoint(out_dir):
    """(path, step) of the whole checkpoint out_dir/latest names, or None when there is none."""
    out = Path(out_dir)
    pointer = out / LATEST
    if not pointer.is_file():
        if (out / TRAIN_STATE).is_file():
            raise ValueError(f"{out} holds a checkpoint of an earlier train.py layout (train_state.pt beside the "
                             "weights), which cannot be resumed safely; start afresh with --resume=False or another "
                             "out_dir")
        return None
    name = pointer.read_text().strip()
    m = re.fullmatch(r"checkpoint-(\d+)", name)
    if m is None or not (out / name / TRAIN_STATE).is_file():
        raise ValueError(f"{pointer} names {name!r}, which is not a checkpoint directory in {out}; resume with "
                         "another out_dir or start afresh with --resume=False")
    return out / name, int(m.group(1))


def read_train_state(path):
    """train_state.pt: tensors and plain data only, so reading it never runs code from the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it would call {culprit.group(1)}" if culprit else "it holds objects"
        raise ValueError(f"refusing to resume from {path}: {what}, and a train state holds only tensors and plain "
                         "data; resume from a checkpoint train.py wrote, or start afresh with --resume=False") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}): the "
                         "file is cut short or damaged; start afresh with --resume=False") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
            not isinstance(state.get("rng_cpu"), list) or not isinstance(state.get("rng_cuda"), list):
        raise ValueError(f"{path} is not a train state written by train.py; start afresh with --resume=False")
    return state


def install(ckpt):
    """Make the whole checkpoint ckpt what the top of its out_dir holds: its model files hard-linked there, the
    index (or adapter_config.json) removed first and linked last, so that a loader finds the previous model, this
    one or none, never a mix; then remove every other checkpoint directory."""
    out = ckpt.parent
    files = {f.name: f for f in sorted(ckpt.iterdir()) if f.name != TRAIN_STATE}

    def unchanged(name):  # (config.json and the tokenizer stay the same from save to save)
        src, dst = files[name], out / name
        return dst.exists() and (os.path.samefile(src, dst) or
                                 (src.stat().st_size < 1 << 20 and src.read_bytes() == dst.read_bytes()))
    todo = [n for n in files if not unchanged(n)]
    stale = [f for f in sorted(out.iterdir()) if f.is_file() and MODEL_FILES.fullmatch(f.name) and f.name not in files]
    if todo or stale:
        last = [n for n in (WEIGHTS_INDEX, "adapter_config.json") if n in files]
        for name in last:
            if (out / name).exists():
                os.unlink(out / name)
        for f in stale:
            os.unlink(f)
        for name in [n for n in todo if n not in last] + last:
            tmp = out / f".{name}.tmp"
            if tmp.exists():
                os.unlink(tmp)
            try:
                os.link(files[name], tmp)
            except OSError:  # no hard links on this file system: a copy
                shutil.copyfile(files[name], tmp)
                fsync(tmp)
            os.replace(tmp, out / name)
        fsync(out)
    for d in sorted(out.glob("checkpoint-*")):
        if d.is_dir() and d != ckpt:
            shutil.rmtree(d)


# ----------------------------------------------------------------------------------------------------------

def keep_freed_memory():
    """On a CPU, glibc's malloc returns every large freed block (activations, gradients) to the OS at once, and
    the next step faults the same memory back in page by page: 10-15 % of a quick-start step on 2 cores. Serve
    blocks up to 32 MiB from the heap and keep its free top instead (no effect where libc is not glibc)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's largest allowed value)
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def lr_at(step, total, cfg):
    """The rate at a step: a linear warm-up, then a cosine to min_lr, or (wsd: warm-up, stable, decay) the full
    rate until the last cooldown_ratio of the steps, over which it falls linearly to min_lr."""
    lr, min_lr = cfg["learning_rate"], cfg["min_lr"]
    warmup = math.ceil(cfg["warmup_ratio"] * total)
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg["lr_schedule"] == "wsd":
        cooldown = math.ceil(cfg["cooldown_ratio"] * total)
        return lr if step < total - cooldown else min_lr + (lr - min_lr) * (total - step) / cooldown
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def step_flops(model, tokens, seq_len):
    """FLOPs of one training step over `tokens` LLM tokens of length seq_len (the LLM dominates; EVA and the
    Q-Former are left out). Per token: 2N forward; backward 2N for the input gradients through every layer
    the loss flows through, plus 2N for the weight gradients of trainable weights; causal attention adds
    2 * 2 * n_layers * seq_len * dim forward (QK^T and AV, half of it masked), times 3 with its backward."""
    cfg = model.llm.cfg
    n_all = sum(p.numel() for n, p in model.llm.named_parameters() if "tok_embeddings" not in n)
    n_train = sum(p.numel() for n, p in model.llm.named_parameters() if p.requires_grad and "tok_embeddings" not in n)
    attn = 2 * 2 * cfg.n_layers * seq_len * cfg.dim * 3
    return tokens * (4 * n_all + 2 * n_train + attn)


def main(argv, return_model=False):
    from data import LLaVADataset, Tokenizer, collate, length_grouped_order
    from checkpoint import find_bert_vocab
    cfg_ns = {k: v for k, v in globals().items() if not k.startswith("_") and
              isinstance(v, (int, float, bool, str, tuple, type(None), dict))}
    cfg_ns.update(llm_config=None, vision_config=None, token_config=None)  # shapes of a scratch model
    apply_overrides(argv, cfg_ns)
    cfg = cfg_ns
    if cfg["stages"]:
        return run_stages(argv, cfg)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        if not dist.is_initialized():  # (once a process: run_stages calls main for every stage)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    else:
        rank, world = 0, 1
        dev = torch.device(cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    master = rank == 0
    if dev.type == "cpu":
        keep_freed_memory()
    if cfg["shapes_dataset"]:  # the quick start's synthetic clips and vocabularies (skipped once written)
        if master:
            from shapes import make_shapes_dataset
            make_shapes_dataset(**cfg["shapes_dataset"])
        if distributed:
            dist.barrier()
    torch.manual_seed(cfg["seed"] + rank)
    compute_dtype = getattr(torch, cfg["dtype"])
    if dev.type == "cpu" and compute_dtype != torch.float32:
        compute_dtype = torch.float32  # bf16 autocast on a CPU is slow and buys nothing here

    per_step = cfg["micro_batch_size"] * world
    if cfg["global_batch_size"] % per_step:
        raise ValueError(f"global_batch_size {cfg['global_batch_size']} is not a multiple of micro_batch_size x "
                         f"processes = {per_step}")
    accum = cfg["global_batch_size"] // per_step

    out = Path(cfg["out_dir"])
    found = latest_checkpoint(out) if cfg["resume"] else None
    resuming = found is not None
    step, train_state = 0, {}
    if resuming:
        ckpt = found[0]
        train_state = read_train_state(ckpt / TRAIN_STATE)  # before anything else is built from the directory
        step = train_state["step"]
        if step != found[1]:
            raise ValueError(f"{ckpt / TRAIN_STATE} is at step {step}, not {found[1]}: the checkpoint was altered; "
                             "start afresh with --resume=False")
        if not cfg["lora"]:  # (a LoRA run rebuilds its base, then loads its adapters from the checkpoint)
            cfg["init_from"] = str(ckpt)
    elif master and cfg["save_checkpoints"] and (out / LATEST).exists():
        (out / LATEST).unlink()  # a fresh start: an earlier run's checkpoints are never resumed from now on
    src_dir = Path(cfg["init_from"] if cfg["init_from"] not in ("", "scratch") else cfg["llm_path"] or cfg["tokenizer_dir"])
    vocab = find_bert_vocab(src_dir, cfg["bert_path"] or None)
    tokenizer = Tokenizer(src_dir)
    # what every checkpoint carries beside the weights, read now: a resumed run's source is a checkpoint that its
    # next save removes
    side_files = {n: (src_dir / n).read_bytes() for n in TOKENIZER_FILES if (src_dir / n).is_file()}
    side_files["vocab.txt"] = Path(vocab).read_bytes()
    model = build_model(cfg, dev, vocab)  # a resumed run rebuilds from its own last checkpoint
    params = set_trainable(model, cfg["stage"])
    if master:
        n_train = sum(p.numel() for p in params)
        print(f"stage {cfg['stage']}: {n_train / 1e6:.2f}M trainable of "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {world} process(es), "
              f"micro batch {cfg['micro_batch_size']}, accumulation {accum}")
    lora_cfg = None
    if cfg["lora"]:
        from lora import LoRAConfig, apply_lora, load_adapters, quantize_base
        lora_cfg = LoRAConfig(r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"])
        apply_lora(model, lora_cfg)  # freezes the LLM; the visual parts keep the stage's choice
        if resuming:
            load_adapters(model, ckpt, merge=False)
        if cfg["lora_base_quant"]:
            quantize_base(model, cfg["lora_base_quant"])
        model.to(dev)
    model.llm.gradient_checkpointing = cfg["gradient_checkpointing"]
    if cfg["compile"]:
        for block in model.llm.layers:  # regional compilation: compiled once, reused by every layer
            block.compile()
    model.visual.set_dropout(cfg["dropout"])

    if distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for block in model.llm.layers:
            fully_shard(block, mp_policy=mp)
        # EVA is frozen and runs a different number of times on each process (not at all for a text-only batch):
        # it stays out of FSDP, replicated in the compute dtype. The token generator sits in the root group,
        # gathered once per forward however often it runs.
        frozen = set()
        if model.vision is not None:
            model.vision.to(compute_dtype)
            frozen = set(model.vision.parameters()) | set(model.vision.buffers())
        fully_shard(model, mp_policy=mp, ignored_params=frozen)
        autocast = nullcontext()
    else:
        autocast = (torch.autocast(dev.type, dtype=compute_dtype) if compute_dtype != torch.float32
                    else nullcontext())

    data = LLaVADataset(cfg["data_path"], tokenizer, cfg["template"], cfg["image_folder"], cfg["video_folder"],
                        image_size=model.image_size, video_fps=cfg["video_fps"],
                        max_frames=cfg["max_frames"] or None, video_token=cfg["video_token"],
                        max_len=cfg["max_len"], seed=cfg["seed"], cache_videos=cfg["cache_videos"])
    lengths = data.modality_lengths()
    steps_per_epoch = len(data) // cfg["global_batch_size"]
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} samples do not fill one global batch of {cfg['global_batch_size']}")
    total = cfg["max_steps"] or steps_per_epoch * cfg["epochs"]
    if cfg["cache_videos"] and total >= steps_per_epoch:  # a run that reads the whole set: decode it all now
        t_cache = time.time()
        n_read = data.fill_cache()
        if master and n_read:
            print(f"{n_read} videos decoded into memory in {time.time() - t_cache:.1f} s")
        if model.vision is not None and not distributed:  # EVA never trains: keep its features, not the frames
            model.vision.eval()
            with autocast:
                data.encode_cache(lambda pixels: model.encode(pixels.to(dev)))
    if cfg["lr_schedule"] not in ("cosine", "wsd"):
        raise ValueError(f"lr_schedule {cfg['lr_schedule']!r} is not one of 'cosine', 'wsd'")

    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP2 swaps in DTensors
    # two groups: the visual token generator may train at its own rate (visual_scale x the LLM's)
    visual = {id(p) for name, p in model.named_parameters() if p.requires_grad and name.startswith("visual.")}
    visual_scale = (cfg["visual_learning_rate"] or cfg["learning_rate"]) / (cfg["learning_rate"] or 1.0)
    split = [[p for p in params if id(p) not in visual], [p for p in params if id(p) in visual]]
    scales = [scale for scale, group in zip((1.0, visual_scale), split) if group]
    optimizer = torch.optim.AdamW([{"params": group} for group in split if group], lr=cfg["learning_rate"],
                                  betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
                                  fused=dev.type == "cuda" or not distributed)  # (CPU too: 5x a loop's speed)
    if resuming:
        if distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            names = {id(p): n for n, p in model.named_parameters()}
            if [g["params"] for g in train_state["optimizer"]["param_groups"]] != \
                    [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
                raise ValueError(f"{ckpt / TRAIN_STATE}: its optimizer state does not fit this run's trainable "
                                 "parameters; resume with the settings it was written with, or start afresh with "
                                 "--resume=False or another out_dir")
            # not strict: a parameter that never had a gradient (the Q-Former's last text layer) has no state,
            # in the run that saved it as in this one
            set_optimizer_state_dict(model, optimizer, train_state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            try:
                optimizer.load_state_dict(train_state["optimizer"])
            except ValueError as e:  # e.g. written with other trainable parts, or before the two rate groups
                raise ValueError(f"{ckpt / TRAIN_STATE}: its optimizer state does not fit this run's trainable "
                                 f"parameters ({e}); resume with the settings it was written with, or start afresh "
                                 "with --resume=False or another out_dir") from None
        if master:
            print(f"resumed from {ckpt} at step {step}")
            install(ckpt)  # the top of out_dir as a save left it, had a kill cut that save short

    def order_for(epoch):
        if cfg["group_by_length"]:  # micro batches of similar lengths, whatever the process count
            return length_grouped_order(lengths, cfg["micro_batch_size"], cfg["seed"] + epoch)
        return torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg["seed"] + epoch)).tolist()

    def batches(start_step):
        """This rank's micro batches from global step start_step on (a resume's data position). A step's
        global batch is cut into the same micro batches on any number of processes; rank r takes every
        world-th one, so 1 GPU with accumulation and N GPUs compute the same loss and gradient."""
        epoch, s = divmod(start_step, steps_per_epoch)
        B, mb = cfg["global_batch_size"], cfg["micro_batch_size"]
        while True:
            order = order_for(epoch)
            for st in range(s, steps_per_epoch):
                step_samples = order[st * B:(st + 1) * B]
                for j in range(rank, B // mb, world):
                    yield step_samples[j * mb:(j + 1) * mb]
            epoch, s = epoch + 1, 0

    loader = torch.utils.data.DataLoader(_IndexBatches(data, batches(step)), batch_size=None,
                                         num_workers=cfg["num_workers"], collate_fn=collate,
                                         persistent_workers=False)
    wandb = None
    if cfg["wandb_log"] and master:
        import wandb
        wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=not master, desc=f"stage {cfg['stage']}", file=sys.stderr)
    peak = peak_flops(dev)
    model.train()
    if model.vision is not None:
        model.vision.eval()  # frozen and without dropout
    it = iter(loader)  # (draws the workers' seeds from the RNG: restore the saved RNG after it)
    if resuming:
        own = rank if rank < len(train_state["rng_cpu"]) else 0  # (another process count cannot be exact anyway)
        torch.set_rng_state(train_state["rng_cpu"][own])
        if dev.type == "cuda" and train_state["rng_cuda"][own] is not None:
            torch.cuda.set_rng_state(train_state["rng_cuda"][own])
    t0, tokens_seen, flops_seen, losses, skipped = time.time(), 0, 0.0, [], 0
    while step < total:
        lr = lr_at(step, total, cfg)
        for group, scale in zip(optimizer.param_groups, scales):
            group["lr"] = lr * scale
        step_loss = torch.zeros((), device=dev)
        for micro in range(accum):
            batch = next(it)
            skipped += batch["skipped"]
            if "input_ids" not in batch:  # every sample of this micro batch was unreadable
                if not distributed:
                    continue
                batch = blank_batch(tokenizer)  # the other processes wait for this one's collectives
            media = [m.to(dev) if m is not None else None for m in batch["media"]]
            with autocast:
                logits, loss = model(batch["input_ids"].to(dev), media, batch["prompts"],
                                     attention_mask=batch["attention_mask"].to(dev), labels=batch["labels"].to(dev))
            (loss / accum).backward()
            step_loss += loss.detach() / accum
            tokens_seen += logits.shape[0] * logits.shape[1] * world
            flops_seen += step_flops(model, logits.shape[0] * logits.shape[1] * world, logits.shape[1])
            del logits
        if distributed:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss.item())
        bar.update(1)
        if master and step % cfg["log_interval"] == 0:
            dt = time.time() - t0
            msg = {"step": step, "loss": round(losses[-1], 4), "lr": lr, "tokens/s": round(tokens_seen / dt)}
            if peak:
                msg["mfu"] = round(flops_seen / dt / (peak * world), 4)
            if dev.type == "cuda":
                msg["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            bar.write(json.dumps(msg))
            if wandb is not None:
                wandb.log(msg)
            t0, tokens_seen, flops_seen = time.time(), 0, 0.0
        if cfg["save_checkpoints"] and (step % cfg["save_interval"] == 0 or step == total):
            rngs = [(torch.get_rng_state(), torch.cuda.get_rng_state() if dev.type == "cuda" else None)]
            if distributed:  # every process draws its own dropout masks: keep each one's generator
                rngs = rngs * world
                dist.all_gather_object(rngs, rngs[rank])
            state = {"rng_cpu": [r[0] for r in rngs], "rng_cuda": [r[1] for r in rngs], "losses": losses}
            save_checkpoint(model, optimizer, step, cfg, distributed, rank, side_files, state, lora_cfg)
    bar.close()
    skipped = torch.tensor([skipped], device=dev)
    if distributed:
        dist.all_reduce(skipped)
    if master:
        if skipped.item():
            print(f"{int(skipped.item())} unreadable sample(s) were skipped (see the warnings above)")
        print(f"done: {step} steps, final loss {losses[-1] if losses else float('nan'):.4f}, checkpoint in {out}")
    if distributed:
        dist.barrier()  # every process returns once process 0 has written the checkpoint (a next stage reads it)
    return (losses, model) if return_model else losses


def run_stages(argv, cfg):
    """`stages = (1, 2)`: train the stages one after the other in this process, each a main() of its own whose
    settings are the config file(s), then stage_overrides[stage], then the command line's --key=value."""
    overrides = cfg["stage_overrides"]
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f"stage_overrides must be a dict {{stage: {{key: value}}}} (a Python literal on the command "
                         f"line), got {overrides!r}")
    files = [a for a in argv if not a.startswith("--")]
    flags = [a for a in argv if a.startswith("--")]
    losses = []
    for s in cfg["stages"]:
        extra = [f"--{k}={v!r}" for k, v in overrides.get(s, {}).items()]
        losses.append(main(files + [f"--stage={s}"] + extra + flags + ["--stages=()"]))
    return losses


def blank_batch(tokenizer):
    """A one-token text batch with no supervised label: its loss is 0 and so are its gradients."""
    ids = torch.tensor([[tokenizer.bos_id, tokenizer.bos_id]])
    return {"input_ids": ids, "labels": torch.full_like(ids, -100), "attention_mask": torch.ones_like(ids),
            "media": [None], "prompts": [[]], "skipped": 0}


class _IndexBatches(torch.utils.data.IterableDataset):
    """Turns the stream of index lists into dataset items, in worker processes when num_workers > 0."""

    def __init__(self, data, index_batches):
        self.data, self.index_batches = data, index_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for k, indices in enumerate(self.index_batches):
            if info is None or k % info.num_workers == info.id:
                yield [self.data[i] for i in indices]


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        if dist.is_initialized():
            dist.destroy_process_group()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
