"""Checkpoints in the original's layout: the one reader of weight files (safetensors, and pickles read with
weights_only), config.json, the HF LLaMA key names, the one report of missing / unexpected / misshaped keys,
where the files a checkpoint lacks are found (local places first, then the Hugging Face Hub and the LAVIS
download), and the writer of train.py's checkpoints: whole at any kill, resumed without running code."""
import http.client
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from tqdm import tqdm

VISION_PREFIX = "model.vision_tower.vision_tower."
TOKEN_PREFIXES = ("model.vlm_att_", "model.mm_projector.")
WEIGHTS_INDEX = "pytorch_model.bin.index.json"
# LAVIS publishes the weights outside the Hugging Face Hub; the variables let a mirror (or a test) stand in
EVA_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
EVA_URL_ENV, CACHE_ENV = "LLAMAVID_EVA_URL", "LLAMAVID_CACHE"

# config.json fields the loaders read and what each must hold when present (null counts as absent): a wrong type
# would otherwise surface deep inside a constructor
CONFIG_FIELDS = {
    "vocab_size": int, "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int,
    "num_key_value_heads": int, "intermediate_size": int, "max_position_embeddings": int, "rms_norm_eps": float,
    "rope_theta": float, "rope_scaling": dict, "rope_parameters": dict, "mm_hidden_size": int, "video_token": int,
    "qformer_num_heads": int, "image_processor": str, "mm_vision_tower": str, "compress_type": str,
    "bert_type": str, "mm_projector_type": str, "mm_vision_select_feature": str,
}
_WANT = {int: "a positive integer", float: "a positive number", str: "a string", dict: "an object"}


def _field_ok(value, kind) -> bool:
    if kind in (int, float):
        number = (int,) if kind is int else (int, float)
        return isinstance(value, number) and not isinstance(value, bool) and 0 < value < math.inf
    return isinstance(value, kind)


def check_config(hf, source="config.json"):
    """Raise a one-line ValueError naming source and the field when a config.json field has the wrong type."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source} holds a JSON {type(hf).__name__}, not an object: not a checkpoint config")
    fields = [(key, hf.get(key), kind) for key, kind in CONFIG_FIELDS.items()]
    for group in ("rope_scaling", "rope_parameters"):
        if isinstance(hf.get(group), dict):
            fields += [(f"{group}.{k}", hf[group].get(k), float) for k in ("factor", "rope_theta")]
    for key, value, kind in fields:
        if value is not None and not _field_ok(value, kind):
            raise ValueError(f"{source}: {key!r} is {json.dumps(value)[:60]}, expected {_WANT[kind]}; "
                             "the file is damaged or was edited by hand: fix it or fetch it again")


# HF LLaMA names on the left, ours on the right; None = stored but not a weight (skipped).
LLAMA_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_UNMAPPED = object()


def hf_to_ours(key: str):
    """Our name for an HF LLaMA key; None to skip it; _UNMAPPED when the table does not know it."""
    generic = re.sub(r"\.(\d+)\.", ".{}.", key, count=1)
    if generic not in LLAMA_KEYS:
        return _UNMAPPED
    ours = LLAMA_KEYS[generic]
    if ours is None:
        return None
    m = re.search(r"\.(\d+)\.", key)
    return ours.format(m.group(1)) if m else ours


def ours_to_hf(key: str) -> str:
    """The inverse of hf_to_ours (for saving in the original layout)."""
    generic = re.sub(r"\.(\d+)\.", ".{}.", key, count=1)
    for hf, ours in LLAMA_KEYS.items():
        if ours == generic:
            m = re.search(r"\.(\d+)\.", key)
            return hf.format(m.group(1)) if m else hf
    raise KeyError(key)


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = path / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{cfg} is missing: a checkpoint directory needs the config.json it was saved with")
    try:
        hf = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg} is not valid JSON ({e})") from None
    check_config(hf, cfg)
    return hf


def checkpoint_files(path: Path) -> list:
    """The weight files of an HF checkpoint directory, in load order; every file the index names must exist."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", WEIGHTS_INDEX):
        index = path / index_name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index} is not a valid shard index ({e!r})") from None
            missing = [n for n in names if not (path / n).exists()]
            if missing:
                raise FileNotFoundError(f"{path}: shard(s) listed in {index_name} are missing: {', '.join(missing)}; "
                                        "copy the complete checkpoint directory")
            return [path / n for n in names]
    for pattern in ("model.safetensors", "pytorch_model.bin", "*.safetensors"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no weights in {path}: expected pytorch_model.bin, pytorch_model-*.bin with "
                            "pytorch_model.bin.index.json, or *.safetensors")


def _first_line(e: Exception) -> str:
    """An exception's first sentence, for a one-line message (torch's reader errors run on with advice)."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    text = lines[0].split(". ")[0].rstrip(".")
    if len(text) > 200:
        text = text[:200].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {text}"


def load_pickle(file: Path):
    """torch.load of a .bin / .pth file with weights_only=True: tensors and plain containers, and no code runs.
    A file that cannot be read this way is a one-line ValueError that says why: truncated or foreign, or holding
    pickled objects other than tensors (a pickle may run any code when loaded: such a file is refused)."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        # the weights-only unpickler stops at the first global, call or object it does not allow; other
        # unpickling errors are damaged data
        found = re.search(r"GLOBAL (\S+)|unrecognized function (\S+)|got (<class \S+)|module (\S+) is blocked", str(e))
        if found:
            what = next(g for g in found.groups() if g).strip("'>,.").removeprefix("<class '")
            raise ValueError(f"{file} holds pickled Python objects other than tensors ({what}), which could run "
                             "code when loaded: it was not loaded. Use a checkpoint from a trusted source") from None
        raise ValueError(f"cannot read weight file {file}: {_first_line(e)}; the file is truncated or not a "
                         "checkpoint, download it again") from None
    except Exception as e:  # a truncated or foreign file: say which one, not where in torch it broke
        raise ValueError(f"cannot read weight file {file}: {_first_line(e)}; the file is truncated or not a "
                         "checkpoint, download it again") from None


def iter_tensors(file: Path) -> Iterator:
    """(name, tensor) pairs of one weight file. Pickles are read with weights_only=True: no code runs."""
    if file.suffix == ".safetensors":
        try:  # one tensor at a time, so a shard is never held whole in memory beside the model
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read weight file {file}: {_first_line(e)}; the file is truncated or not a "
                             "checkpoint, download it again") from None
        return
    state = load_pickle(file)
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict (found {type(state).__name__})")
    if "model" in state and isinstance(state["model"], dict):  # LAVIS style {'model': {...}}
        state = state["model"]
    yield from state.items()


def read_tensors(file) -> dict:
    """Every tensor of one weight file (the one reader: safetensors, or a pickle read with weights_only)."""
    return dict(iter_tensors(Path(file)))


def report_mismatch(what, missing=(), unexpected=(), wrong_shape=()):
    """The one report of weights that do not fit a model: a one-line ValueError naming `what` (a file, a
    checkpoint) and, ten at most of each, the keys missing, the keys the model has no place for, and the keys whose
    shapes differ ("key: checkpoint (a, b) vs model (c, d)"). Nothing to report, nothing raised."""
    parts = []
    if wrong_shape:
        parts.append("wrong shape: " + "; ".join(list(wrong_shape)[:10]))
    if missing:
        parts.append(f"missing ({len(missing)}): " + ", ".join(list(missing)[:10]))
    if unexpected:
        parts.append(f"unexpected ({len(unexpected)}): " + ", ".join(list(unexpected)[:10]))
    if parts:
        raise ValueError(f"{what} does not match the model: " + " | ".join(parts))


def check_state(what, state: dict, expected: dict, name=lambda key: key):
    """Compare a state dict with a model's (expected: key -> tensor or shape) and report_mismatch() what differs;
    name(key) gives the name a user knows a key by (the checkpoint's, where ours differ)."""
    shape = lambda t: tuple(t.shape) if hasattr(t, "shape") else tuple(t)  # noqa: E731
    report_mismatch(what, [name(k) for k in expected if k not in state], [name(k) for k in state if k not in expected],
                    [f"{name(k)}: checkpoint {shape(v)} vs model {shape(expected[k])}" for k, v in state.items()
                     if k in expected and shape(v) != shape(expected[k])])


def load_weights(model: nn.Module, path, rename: Callable, dtype=torch.float32, device="cpu",
                 files=None, strict_missing: bool = True, side: Optional[dict] = None) -> set:
    """Fill a model built on the meta device from a checkpoint directory, one weight file at a time.

    rename(checkpoint_key) -> our parameter name, None to skip the key, _UNMAPPED for a key we do not know, or
    (group, key) to set the tensor aside in side[group][key] for another module's loader.
    Unknown, missing and wrongly shaped keys are collected and reported together. Returns the loaded names.
    """
    model.to(dtype=dtype).to_empty(device=device)  # allocate once, in the final dtype
    params = dict(model.named_parameters())
    params.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    loaded, unexpected, bad_shape = set(), [], []
    for file in (files or checkpoint_files(path)):
        for key, tensor in iter_tensors(file):
            name = rename(key)
            if name is None:
                continue
            if isinstance(name, tuple):
                side[name[0]][name[1]] = tensor
                continue
            if name is _UNMAPPED or name not in params:
                unexpected.append(key)
                continue
            if tuple(tensor.shape) != tuple(params[name].shape):
                bad_shape.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(params[name].shape)}")
                continue
            with torch.no_grad():
                params[name].copy_(tensor.to(dtype) if tensor.is_floating_point() else tensor)
            loaded.add(name)
    missing = [n for n in params if n not in loaded] if strict_missing else []
    report_mismatch(f"checkpoint {path} (with the shapes its config.json gives)", missing, unexpected, bad_shape)
    return loaded


def find_vision_weights(model_dir: Path, vision_tower: str = "", vision_path=None, download: bool = False) -> Path:
    """The EVA weights a checkpoint directory does not hold, looked for in a fixed order (vision_tower: config.json's
    mm_vision_tower); with download, fetched once into eva_cache_path() when found nowhere (never when
    HF_HUB_OFFLINE is set)."""
    candidates = [Path(vision_path)] if vision_path else []
    candidates += [model_dir / "eva_vit_g.pth", model_dir.parent / "eva_vit_g.pth"]
    if vision_tower:
        candidates.append(Path(vision_tower))  # relative to the working directory, as the original
    candidates.append(eva_cache_path())
    for c in candidates:
        if c.is_file():
            return c
    if vision_path:
        raise FileNotFoundError(f"vision weights {vision_path} do not exist")
    if download and not hub_offline():
        return download_eva_weights()
    raise FileNotFoundError("EVA-ViT-g weights (eva_vit_g.pth) not found; looked in: "
                            + ", ".join(str(c) for c in candidates) + ". Pass --vision-path eva_vit_g.pth, or "
                            f"download {eva_url()} to {eva_cache_path()}"
                            + (" (HF_HUB_OFFLINE is set: nothing is downloaded)" if download else ""))


BERT_ID = "bert-base-uncased"  # the Q-Former's WordPiece vocabulary, on the Hugging Face Hub


def find_bert_vocab(model_dir: Path, bert_path=None, download: bool = False) -> Path:
    """bert-base-uncased's vocab.txt for the Q-Former's tokenizer (no checkpoint holds it); with download, the
    Hugging Face Hub's copy, fetched into its cache, when none is found locally."""
    candidates = []
    if bert_path:
        p = Path(bert_path)
        candidates.append(p / "vocab.txt" if p.is_dir() else p)
    candidates += [model_dir / "vocab.txt", model_dir.parent / BERT_ID / "vocab.txt"]
    candidates += sorted(hf_cache_dir().glob(f"models--{BERT_ID}/snapshots/*/vocab.txt"))
    for c in candidates:
        if c.is_file():
            return c
    if download:  # its config.json too: the Q-Former's head count is read from beside the vocabulary
        hub_download(BERT_ID, "config.json")
        return hub_download(BERT_ID, "vocab.txt")
    raise FileNotFoundError("the Q-Former's WordPiece vocabulary (bert-base-uncased vocab.txt) was not found; "
                            "looked in: " + ", ".join(str(c) for c in candidates) + ". Download bert-base-uncased's "
                            "vocab.txt and pass --bert-path, or put it in the checkpoint directory")


# ----------------------------------------------------------------------------------------------------------
# released checkpoints by Hugging Face Hub id. huggingface_hub is optional: imported only when an id is given.
# Its environment variables apply: HF_HOME / HF_HUB_CACHE (where files go), HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN.

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
# what a checkpoint directory needs; a repository's other files (training_args.bin, optimizer states, checkpoints
# in subfolders) are never fetched
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.bin", "*.index.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "adapter_config.json",
             "vocab.txt"]
HUB_SKIP = ["*/*", "training_args.bin", "optimizer*", "scheduler*", "rng_state*"]


def is_hub_id(path_or_id) -> bool:
    """'owner/name' that is no existing local path."""
    return (isinstance(path_or_id, (str, Path)) and bool(HUB_ID.fullmatch(str(path_or_id)))
            and not Path(path_or_id).exists())


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub places it: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def checkpoint_dir(path_or_id) -> Path:
    """The local directory a --model-path names. An existing path stays as it is; 'owner/name' that is no local
    path is a Hugging Face Hub id: the files a checkpoint needs (HUB_FILES) are fetched into the HF cache, once,
    and the cached snapshot's directory is returned (from the cache alone when HF_HUB_OFFLINE is set)."""
    if not is_hub_id(path_or_id):
        return Path(path_or_id)
    repo_id = str(path_or_id)
    folder = hub_download(repo_id, allow_patterns=HUB_FILES, ignore_patterns=HUB_SKIP)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{repo_id} on the Hugging Face Hub has no config.json: not a model checkpoint")
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # checkpoint_files says what is wrong with it
        missing = sorted(str(n) for n in shards if not (folder / str(n)).is_file())
        if missing:
            raise FileNotFoundError(f"{repo_id}: {index.name} lists {', '.join(missing)}, which the Hub repository "
                                    f"(or its cached copy in {folder}) lacks; the checkpoint is incomplete")
    return folder


def hub_download(repo_id: str, filename: Optional[str] = None, **snapshot_kw) -> Path:
    """One file (hf_hub_download) or a filtered snapshot (snapshot_download) of a Hub model, through the HF cache
    with huggingface_hub's progress bars. Its errors become one line naming the id and what to do."""
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise ValueError(f"{repo_id} is not a local path, so it is read as a Hugging Face Hub id, which needs "
                         "huggingface_hub: pip install -U huggingface_hub") from None
    what = f"{filename} of {repo_id}" if filename else repo_id
    # a whole checkpoint comes from a --model-path, which may as well be a local path mistyped or not made yet
    subject = what if filename else f"{repo_id} is no local directory, and it"

    def err(*names):  # the error classes of this huggingface_hub version (an empty tuple matches nothing)
        return tuple(getattr(errors, n) for n in names if hasattr(errors, n))
    try:
        if filename:
            return Path(hub.hf_hub_download(repo_id, filename))
        return Path(hub.snapshot_download(repo_id, **snapshot_kw))
    except err("GatedRepoError"):
        raise ValueError(f"{repo_id} is gated on the Hugging Face Hub: accept its terms on its page, then log in "
                         "(hf auth login or HF_TOKEN)") from None
    except err("RepositoryNotFoundError"):
        raise ValueError(f"{repo_id} is neither a local directory nor a model on the Hugging Face Hub "
                         f"({constants.ENDPOINT}): check the name (a private model needs hf auth login)") from None
    except err("RevisionNotFoundError"):
        raise ValueError(f"{repo_id} on the Hugging Face Hub has no main revision") from None
    except err("LocalEntryNotFoundError", "OfflineModeIsEnabled"):  # not cached, and no Hub to ask
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(f"{subject} is not (completely) in the Hugging Face cache {cache} and "
                                    "HF_HUB_OFFLINE is set: check the path, or run once with network access to "
                                    "fetch it") from None
        raise FileNotFoundError(f"{subject} could not be fetched: the Hugging Face Hub ({constants.ENDPOINT}) could "
                                f"not be reached and the cache {cache} has no complete copy; check the path, or the "
                                "network connection (and HF_ENDPOINT)") from None
    except err("EntryNotFoundError"):
        raise FileNotFoundError(f"{repo_id} on the Hugging Face Hub has no {filename or 'such file'}") from None
    except err("HfHubHTTPError", "FileMetadataError") as e:
        raise FileNotFoundError(f"could not fetch {what} from the Hugging Face Hub ({_first_line(e)}); "
                                "try again later") from None
    except err("HFValidationError"):
        raise ValueError(f"{repo_id} is neither a local path nor a valid Hugging Face Hub id") from None


def eva_url() -> str:
    return os.environ.get(EVA_URL_ENV) or EVA_URL


def eva_cache_path() -> Path:
    """Where downloaded EVA weights are kept: $LLAMAVID_CACHE/eva_vit_g.pth, by default ~/.cache/llamavid
    ($XDG_CACHE_HOME/llamavid when that is set). Not in the Hugging Face cache, which holds Hub repositories only."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamavid"
    return Path(root).expanduser() / "eva_vit_g.pth"


def download_eva_weights(dest=None, url=None) -> Path:
    """Fetch LAVIS eva_vit_g.pth (about 2 GB) to dest (default eva_cache_path()) unless it is there; returns
    its path. The bytes go to a temporary file in the same folder, renamed only once complete, so an interrupted
    download never leaves a partial eva_vit_g.pth."""
    dest, url = Path(dest or eva_cache_path()), url or eva_url()
    if dest.is_file():
        return dest
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise OSError(f"the connection closed after {f.tell()} of {total} bytes")
        os.replace(tmp, dest)
        tmp = None
    # URLError and HTTPError are OSErrors; HTTPException: a broken response; ValueError: a malformed URL
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise FileNotFoundError(f"could not download the EVA-ViT-g weights from {url} ({reason}); download "
                                f"eva_vit_g.pth yourself and pass --vision-path, or put it at {dest}") from None
    finally:
        if tmp is not None:  # an error or an interrupt (Ctrl-C): no partial file stays behind
            Path(tmp).unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------------------------------------
# writing: train.py's checkpoints, in the original's layout
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

TRAIN_STATE = "train_state.pt"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
LATEST = "latest"
# what a save puts at the top of out_dir; a file of these names that the new checkpoint lacks is stale
MODEL_FILES = re.compile(r"pytorch_model.*\.bin|pytorch_model\.bin\.index\.json|model.*\.safetensors(\.index\.json)?|"
                         r"mm_projector\.bin|adapter_model\..*|adapter_config\.json|non_lora_trainables\.bin|"
                         + re.escape(TRAIN_STATE))


def to_original_keys(state: dict, model) -> dict:
    """A LlamaVID state dict under the original checkpoint's names (what the original code and sample.py load)."""
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


def shard_weights(weights: dict, max_bytes: int) -> dict:
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


def save_weights(weights: dict, folder: Path, max_bytes: int):
    """pytorch_model-0000k-of-0000n.bin (plain dicts of tensors) and pytorch_model.bin.index.json."""
    weight_map = {}
    for name, shard in shard_weights(weights, max_bytes).items():
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_model_files(folder: Path, model, state: Optional[dict], files: dict, max_shard_size="10GB",
                      projector_file: bool = False):
    """The files the original's builder (and ours) loads a model from, written into folder. state: the model's
    full state dict (None: no weights, as a LoRA run that keeps only its adapters); files: {name: bytes} of the
    tokenizer and the vocabulary; projector_file: also mm_projector.bin, the trainable parts of stage 1 alone,
    which the original's stage 2 reads."""
    if state is not None:
        weights = {}
        for k, v in to_original_keys(state, model).items():
            v = v.contiguous()
            # a view (a slice of a fused weight) would be written with the whole storage under it
            weights[k] = v.clone() if v.untyped_storage().nbytes() != v.nbytes else v
        save_weights(weights, folder, parse_size(max_shard_size))
        if projector_file:
            torch.save({k: v for k, v in weights.items() if k.startswith(TOKEN_PREFIXES)}, folder / "mm_projector.bin")
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


def write_checkpoint(out_dir, step: int, train_state: dict, write_model: Callable):
    """Write out_dir/checkpoint-{step} whole (write_model(folder) puts the model files in it; train_state goes to
    train_state.pt), point out_dir/latest at it, and put its model files at the top of out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step}"
    staging, ckpt = out / f"{name}.partial", out / name
    if staging.exists():  # left by a killed save
        shutil.rmtree(staging)
    staging.mkdir()
    write_model(staging)
    torch.save(train_state, staging / TRAIN_STATE)
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


def read_train_state(path) -> dict:
    """train_state.pt: tensors and plain data only, so reading it never runs code from the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it would call {culprit.group(1)}" if culprit else "it holds objects"
        raise ValueError(f"refusing to resume from {path}: {what}, and a train state holds only tensors and plain "
                         "data; resume from a checkpoint train.py wrote, or start afresh with --resume=False") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read {path} ({_first_line(e)}): the file is cut short or damaged; start afresh "
                         "with --resume=False") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
            not isinstance(state.get("rng_cpu"), list) or not isinstance(state.get("rng_cuda"), list):
        raise ValueError(f"{path} is not a train state written by train.py; start afresh with --resume=False")
    return state


def install(ckpt: Path):
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
