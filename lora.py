"""Its own file because LoRA rewrites a built LLaMA (wrapping its projections) rather than defining one, and train.py,
sample.py and the original's peft outputs all meet here: adapters, merging, and loading LLaVA-style LoRA runs."""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from checkpoint import (LLAMA_KEYS, TOKEN_PREFIXES, VISION_PREFIX, _UNMAPPED, check_state, hf_to_ours, ours_to_hf,
                        read_config, read_tensors, report_mismatch)
from model import LlamaVIDConfig, load_llamavid
from quantize import quantize_linear

# A LoRA layer adds a low-rank path beside a frozen projection:  y = base(x) + scaling * B(A(dropout(x)))
# with A (r, in) random (kaiming-uniform, as nn.Linear and peft initialise it), B (out, r) zero, so training starts
# from the base model exactly; scaling = alpha / r (alpha / sqrt(r) with rsLoRA).
#
# Files are peft's layout, so the original's LoRA runs load here and ours load in the original (PeftModel):
#   adapter_config.json          peft's LoraConfig fields (r, lora_alpha, lora_dropout, target_modules in HF's
#                                names, use_rslora): all of LoRAConfig, so nothing of ours needs adding
#   adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (r, in), lora_B (out, r)
#                                (the original's may be adapter_model.bin, and may keep peft's adapter name:
#                                ...q_proj.lora_A.default.weight)
#   non_lora_trainables.bin      what else trained, as LLaVA-style training writes it:
#                                base_model.model.model.mm_projector.0.weight, base_model.model.model.vlm_att_query, ...

# our linear layers' names <-> HF's, from model.py's table (wq <-> q_proj, w1 <-> gate_proj, output <-> lm_head)
HF_PROJ = {ours.split(".")[-2]: hf.split(".")[-2] for hf, ours in LLAMA_KEYS.items()
           if ours is not None and hf.split(".")[-2].endswith(("_proj", "lm_head"))}
OURS_PROJ = {v: k for k, v in HF_PROJ.items()}
PEFT_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM -> LoraModel -> the HF model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILE = "non_lora_trainables.bin"


# ----------------------------------------------------------------------------------------------------------
# config

@dataclass
class LoRAConfig:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05  # on the input of the low-rank path only
    # every attention and MLP projection of the LLM: the original's find_all_linear_names (all nn.Linear but
    # lm_head, the projectors, the Q-Former and the vision tower). HF names (q_proj, ...) are accepted too.
    targets: tuple = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r (peft's use_rslora)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(OURS_PROJ.get(t, t) for t in self.targets)
        if not self.targets:
            raise ValueError("LoRA targets is empty: name the projections to adapt, e.g. ('wq', 'wv')")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.rslora)

    @classmethod
    def tiny(cls, **kw) -> "LoRAConfig":
        return cls(**{**dict(r=8, alpha=16.0, dropout=0.0), **kw})


def lora_scaling(alpha, r, rslora=False) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# ----------------------------------------------------------------------------------------------------------
# the layer

def is_quantized(module: nn.Module) -> bool:
    """A frozen base we cannot add to: anything but nn.Linear (quantize.Int8Linear / Int4Linear and the like)."""
    return not isinstance(module, nn.Linear)


class _FrozenQuantized(torch.autograd.Function):
    """y = base(x) for a quantised base. Its input gradient is grad @ W with W dequantised inside backward and
    dropped at once: no full-precision weight is kept from forward to backward (the point of a quantised base), and
    it works for kernels that have no derivative of their own (torch's int4 matmuls)."""

    @staticmethod
    def forward(ctx, x, base):
        ctx.base, ctx.x_dtype = base, x.dtype
        return base(x)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.base.dequantize(grad.dtype)  # (out, in)
        return (grad @ w).to(ctx.x_dtype), None


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update. The base is an nn.Linear (any float dtype) or a
    quantised layer: any module with forward(x), in_features, out_features, and dequantize(dtype) -> (out, in)
    weight for the backward pass (quantize.py's Int8Linear / Int4Linear). For int4 training prefer
    backend='dequant': the kernel backends' dequantize() multiplies an identity matrix, at every backward.

    merge() folds scaling * B @ A into a float base weight (inference at the base's speed) and unmerge() takes it
    back out; both compute the update in float32. Unmerging restores the weight up to the rounding of its dtype
    (float32: ~1e-7 relative; bf16: one bf16 step). A quantised base cannot be merged into (its weight is not a
    float tensor, and re-quantising would change the base): merge raises ValueError. To serve a LoRA run
    quantised, merge into the float base first (merge_peft_lora), then quantize.quantize_model."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype=None):
        super().__init__()
        for attr in ("in_features", "out_features"):
            if not hasattr(base, attr):
                raise ValueError(f"LoRA cannot wrap {type(base).__name__}: it has no {attr}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = lora_scaling(self.alpha, r, rslora)
        w = getattr(base, "weight", None)
        device = w.device if w is not None else None
        if dtype is None:  # adapters in the float base's dtype; float32 beside a quantised base
            dtype = w.dtype if isinstance(base, nn.Linear) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, which peft uses for A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        if not is_quantized(self.base):
            w = self.base.weight
            cast = x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type)
            y = self.base(x.to(w.dtype) if cast else x)  # a bf16 base beside float32 activations: its own dtype
        elif hasattr(self.base, "dequantize"):
            y = _FrozenQuantized.apply(x, self.base)
        else:
            y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), in float32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return self
        _add_to_weight(self.base, self.delta_weight(), "merge")
        self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return self
        _add_to_weight(self.base, -self.delta_weight(), "unmerge")
        self.merged = False
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, merged={self.merged}")


def _add_to_weight(module, delta, what, name=""):
    if is_quantized(module):
        of = f" of {name}" if name else ""
        raise ValueError(f"cannot {what} LoRA{of} into a quantised {type(module).__name__}: merge into the float "
                         "weights first (load the float base, merge_peft_lora / merge_lora), then quantise")
    w = module.weight
    w.copy_((w.float() + delta.to(w.device)).to(w.dtype))


# ----------------------------------------------------------------------------------------------------------
# a model's adapters

def _llm(model):
    """The LLaMA inside a LlamaVID, or the LLaMA itself."""
    return model.llm if hasattr(model, "llm") else model


def lora_layers(model) -> dict:
    """{our module name (layers.0.attention.wq): LoRALinear} of the LLM."""
    return {name: m for name, m in _llm(model).named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, cfg: LoRAConfig, dtype=None) -> list:
    """Freeze the LLM (of a LlamaVID, or a LLaMA) and wrap every projection named in cfg.targets in a LoRALinear,
    in place. Returns the adapter parameters (the only ones of the LLM that train). Other parts of a LlamaVID
    keep their requires_grad: call this after train.py's set_trainable. Call it before FSDP's fully_shard and
    before quantising the bases (quantize_base)."""
    llm = _llm(model)
    if lora_layers(llm):
        raise ValueError("this model already has LoRA layers: apply_lora once (load_adapters fills existing ones)")
    llm.requires_grad_(False)
    targets = [(parent, name) for parent in llm.modules() for name, child in parent.named_children()
               if name in cfg.targets and not isinstance(child, LoRALinear)]
    if not targets:
        raise ValueError(f"no module of the LLM is named one of {cfg.targets}: LoRA targets are our projection "
                         f"names {tuple(HF_PROJ)} (or HF's {tuple(OURS_PROJ)})")
    params = []
    for parent, name in targets:
        layer = LoRALinear(getattr(parent, name), cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, dtype)
        setattr(parent, name, layer)
        params += [layer.lora_A, layer.lora_B]
    return params


def lora_state_dict(model_or_state) -> dict:
    """The adapter tensors only (keys ending in .lora_A / .lora_B), named as in the model's state dict. Takes a
    model or a state dict already gathered (FSDP's full state dict)."""
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    return {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its float base and put the plain projections back (LoRALinear removed): the model
    is a plain LLaMA again, to save in the original layout or to quantise."""
    llm = _llm(model)
    for name, layer in lora_layers(llm).items():
        layer.merge()
        parent_name, _, leaf = name.rpartition(".")
        setattr(llm.get_submodule(parent_name) if parent_name else llm, leaf, layer.base)
    return model


@torch.no_grad()
def merged_state_dict(model, state: Optional[dict] = None) -> dict:
    """A state dict with every LoRA layer folded into a plain weight (layers.0.attention.wq.weight), ready for
    checkpoint.to_original_keys: a full checkpoint that LlamaVID.from_pretrained loads without peft.
    state: the (gathered, full) state dict to use instead of model.state_dict(); the model gives the scalings."""
    state = dict(model.state_dict() if state is None else state)
    prefix = "llm." if hasattr(model, "llm") else ""
    for name, layer in lora_layers(model).items():
        key = prefix + name
        if is_quantized(layer.base):
            raise ValueError(f"{key}: its base is quantised, so there is no float weight to merge into; save the "
                             "adapters (save_adapters) and merge into the float base at load time")
        A, B = state.pop(key + ".lora_A").float(), state.pop(key + ".lora_B").float()
        w = state.pop(key + ".base.weight")
        delta = 0 if layer.merged else (B @ A) * layer.scaling  # a merged layer's weight already holds it
        state[key + ".weight"] = (w.float() + delta).to(w.dtype)
        for k in [k for k in state if k.startswith(key + ".base.")]:  # a bias, if a base has one
            state[key + "." + k[len(key) + 6:]] = state.pop(k)
    return state


def quantize_base(model, mode: str, groupsize: int = 128, backend: str = "dequant"):
    """Shrink the frozen bases of the LoRA layers (QLoRA-style training): 'bf16' casts them, 'int8' / 'int4' swap
    them for quantize.py's layers. Adapters, embeddings, norms and the output head stay as they are (float32 master
    weights). int4 defaults to the 'dequant' backend, whose dequantize() the backward pass can afford."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("quantize_base: the model has no LoRA layers; call apply_lora first")
    if mode not in ("bf16", "int8", "int4"):
        raise ValueError(f"lora base quantisation {mode!r} is not 'bf16', 'int8' or 'int4'")
    for layer in layers.values():
        if layer.merged:
            raise ValueError("quantize_base: unmerge the adapters first (a merged base holds the update)")
        if not isinstance(layer.base, nn.Linear):
            continue  # quantised already
        if mode == "bf16":
            layer.base.to(torch.bfloat16)
        else:
            layer.base = quantize_linear(layer.base, mode, groupsize, backend=backend).requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------
# saving: peft's layout

def _hf_module(ours_module: str) -> str:
    return ours_to_hf(ours_module + ".weight")[:-len(".weight")]


def _ours_module(hf_module: str):
    ours = hf_to_ours(hf_module + ".weight")
    return None if ours is None or ours is _UNMAPPED else ours[:-len(".weight")]


def peft_state_dict(model, state: Optional[dict] = None) -> dict:
    """Adapters under peft's names: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    state = lora_state_dict(model if state is None else state)
    prefix = "llm." if hasattr(model, "llm") else ""
    out = {}
    for name in lora_layers(model):
        hf = PEFT_PREFIX + _hf_module(name)
        out[hf + ".lora_A.weight"] = state[prefix + name + ".lora_A"]
        out[hf + ".lora_B.weight"] = state[prefix + name + ".lora_B"]
    return out


def non_lora_state_dict(model, state: Optional[dict] = None) -> dict:
    """What else trains beside the adapters (of a LlamaVID: the token generator's trainable parts), under the
    names LLaVA-style training gives non_lora_trainables.bin (base_model.model.model.mm_projector.0.weight)."""
    state = model.state_dict() if state is None else state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = set(lora_state_dict(state))
    out = {}
    if hasattr(model, "visual"):
        visual = {k[7:]: state[k] for k in state if k.startswith("visual.") and k in trainable}
        out.update(model.visual.llamavid_state_dict(visual) if visual else {})
    prefix = "llm." if hasattr(model, "llm") else ""
    for k in state:
        if k.startswith(prefix) and k in trainable and k not in lora and ".base." not in k:
            out[ours_to_hf(k[len(prefix):])] = state[k]
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_adapters(model, out_dir, cfg: LoRAConfig, state: Optional[dict] = None, base_model: str = "",
                  non_lora: bool = True):
    """Write adapter_config.json + adapter_model.safetensors (peft's layout: PeftModel.from_pretrained and the
    original load them) and, with non_lora, non_lora_trainables.bin of whatever else trains.
    state: a gathered full state dict (FSDP) instead of model.state_dict()."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in peft_state_dict(model, state).items()}
    if not tensors:
        raise ValueError("save_adapters: the model has no LoRA layers (apply_lora first)")
    layers = lora_layers(model)
    rank_pattern = {_hf_module(n): m.r for n, m in layers.items() if m.r != cfg.r}
    alpha_pattern = {_hf_module(n): m.alpha for n, m in layers.items() if m.alpha != cfg.alpha}
    config = {  # peft's LoraConfig fields: what its from_pretrained (and so the original) reads
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": [HF_PROJ.get(t, t) for t in cfg.targets], "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_dora": False, "inference_mode": True,
    }
    tmp = out / (ADAPTER_FILES[0] + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / ADAPTER_FILES[0])
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    if non_lora:
        extra = non_lora_state_dict(model, state)
        if extra:
            torch.save(extra, out / NON_LORA_FILE)
    return out


# ----------------------------------------------------------------------------------------------------------
# loading peft's layout (the original's LoRA runs, and ours)

def read_adapter_config(lora_dir) -> dict:
    path = Path(lora_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a LoRA directory holds the adapter_config.json peft writes")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{path} has no {key!r}: not a peft LoRA config")
    for key, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (GPT-2 Conv1D) layers")):
        if cfg.get(key):
            raise ValueError(f"{path}: {why} is not supported here (only plain LoRA on linear layers)")
    return cfg


def config_from_peft(peft_cfg: dict) -> LoRAConfig:
    """Our LoRAConfig from a peft adapter_config.json dict (a regex target_modules keeps our default targets)."""
    targets = peft_cfg.get("target_modules")
    targets = tuple(OURS_PROJ.get(t, t) for t in targets) if isinstance(targets, list) else LoRAConfig.targets
    return LoRAConfig(r=int(peft_cfg["r"]), alpha=float(peft_cfg["lora_alpha"]),
                      dropout=float(peft_cfg.get("lora_dropout") or 0.0), targets=targets,
                      rslora=bool(peft_cfg.get("use_rslora", False)))


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: an exact module name, else a regex matching its tail."""
    if module in patterns:
        return patterns[module]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def read_peft_adapters(lora_dir) -> tuple:
    """(adapter_config dict, {our module name: (A (r, in), B (out, r), scaling, alpha)}, {our param name: tensor}
    of modules_to_save) from a peft LoRA directory, every key and shape checked against adapter_config.json."""
    lora_dir = Path(lora_dir)
    peft_cfg = read_adapter_config(lora_dir)
    file = next((lora_dir / f for f in ADAPTER_FILES if (lora_dir / f).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{lora_dir} has no adapter weights: expected one of {', '.join(ADAPTER_FILES)}")
    targets = peft_cfg.get("target_modules")
    r0, alpha0, rslora = int(peft_cfg["r"]), float(peft_cfg["lora_alpha"]), bool(peft_cfg.get("use_rslora"))
    pairs, full = {}, {}
    for key, tensor in read_tensors(file).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if "lora_embedding_" in name or "lora_magnitude_vector" in name:
            raise ValueError(f"{file}: {key!r} is an embedding LoRA / DoRA weight, which is not supported here")
        m = _LORA_KEY.match(name)
        if m is None:
            if "lora_" in name:
                raise ValueError(f"{file}: cannot read LoRA key {key!r} (expected ...q_proj.lora_A.weight)")
            # a modules_to_save copy (peft: lm_head.modules_to_save.default.weight): a whole new weight
            plain = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", name)
            ours = hf_to_ours(plain)
            if ours is None or ours is _UNMAPPED:
                raise ValueError(f"{file}: {key!r} is no LoRA weight nor a weight of the LLM")
            full[ours] = tensor
            continue
        module = m.group("module")
        ours = _ours_module(module)
        if ours is None:
            raise ValueError(f"{file}: LoRA key {key!r} is for {module!r}, which is not a projection of the LLM")
        leaf = module.split(".")[-1]
        if isinstance(targets, list) and leaf not in targets:
            raise ValueError(f"{file}: LoRA key {key!r} is for {leaf!r}, not among adapter_config.json's "
                             f"target_modules {targets}")
        if isinstance(targets, str) and targets != "all-linear" and not re.fullmatch(targets, module):
            raise ValueError(f"{file}: LoRA key {key!r} does not match adapter_config.json's target_modules "
                             f"{targets!r}")
        pairs.setdefault(ours, {})[m.group("ab")] = (key, tensor)
    if not pairs:
        raise ValueError(f"{file} holds no LoRA weights (keys like ...q_proj.lora_A.weight)")
    adapters = {}
    for ours, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            have = next(iter(ab.values()))[0]
            raise ValueError(f"{file}: {have!r} has no lora_{'B' if 'A' in ab else 'A'} partner: the file is cut short")
        (ka, A), (kb, B) = ab["A"], ab["B"]
        hf = _hf_module(ours)
        r = int(_pattern_value(peft_cfg.get("rank_pattern") or {}, hf, r0))
        alpha = float(_pattern_value(peft_cfg.get("alpha_pattern") or {}, hf, alpha0))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"{file}: {ka!r} {tuple(A.shape)} / {kb!r} {tuple(B.shape)} do not have rank {r} of "
                             f"{lora_dir / ADAPTER_CONFIG}")
        adapters[ours] = (A, B, lora_scaling(alpha, r, rslora), alpha)
    return peft_cfg, adapters, full


@torch.no_grad()
def load_adapters(model, lora_dir, merge: bool = False, non_lora: bool = True, dropout: Optional[float] = None):
    """Load a peft-layout LoRA directory (the original's LoRA output, or ours) into a LlamaVID or a LLaMA.

    merge=True adds scaling * B @ A to the float base weights (no LoRA layers remain; inference at full speed).
    merge=False keeps the adapters separate in LoRALinear layers (made here, or filled when apply_lora made them
    already, e.g. to resume training). non_lora: also load non_lora_trainables.bin when the directory has it.
    Returns (LoRAConfig read from adapter_config.json, the non-LoRA state dict with LLaVA's prefixes stripped:
    model.mm_projector.0.weight, ...; empty when there is none)."""
    lora_dir = Path(lora_dir)
    peft_cfg, adapters, full = read_peft_adapters(lora_dir)
    cfg = config_from_peft(peft_cfg)
    llm = _llm(model)
    modules = dict(llm.named_modules())
    params = dict(llm.named_parameters())
    for ours, (A, B, scaling, alpha) in adapters.items():
        mod = modules.get(ours)
        if mod is None or not hasattr(mod, "in_features"):
            raise ValueError(f"{lora_dir}: LoRA for {_hf_module(ours)!r} but this LLM has no such projection "
                             f"({ours}): an adapter of another model size")
        if (mod.out_features, mod.in_features) != (B.shape[0], A.shape[1]):
            raise ValueError(f"{lora_dir}: LoRA for {_hf_module(ours)!r} is ({B.shape[0]}, {A.shape[1]}), the "
                             f"model's projection is ({mod.out_features}, {mod.in_features}): another model size")
        if merge:
            base = mod.base if isinstance(mod, LoRALinear) else mod
            _add_to_weight(base, (B.float() @ A.float()) * scaling, "merge", _hf_module(ours))
            continue
        if not isinstance(mod, LoRALinear):
            parent_name, _, leaf = ours.rpartition(".")
            mod = LoRALinear(mod, A.shape[0], alpha, cfg.dropout if dropout is None else dropout, cfg.rslora)
            setattr(llm.get_submodule(parent_name), leaf, mod)
        elif mod.r != A.shape[0]:
            raise ValueError(f"{lora_dir}: rank {A.shape[0]} for {_hf_module(ours)!r}, the model's LoRA layer "
                             f"has rank {mod.r}: apply_lora with the adapter's config")
        mod.lora_A.copy_(A), mod.lora_B.copy_(B)
        mod.alpha, mod.scaling = alpha, scaling
    for ours, tensor in full.items():  # modules_to_save: whole weights
        target = params.get(ours, params.get(ours.replace(".weight", ".base.weight")))
        if target is None or target.shape != tensor.shape:
            raise ValueError(f"{lora_dir}: modules_to_save weight for {ours} does not fit this model")
        target.copy_(tensor)
    extra = {}
    if non_lora and (lora_dir / NON_LORA_FILE).is_file():
        extra = load_non_lora_trainables(model, lora_dir / NON_LORA_FILE)
    return cfg, extra


def merge_peft_lora(model, lora_dir):
    """The original's LoRA output merged into a LlamaVID's (or a LLaMA's) base weights, as its builder does with
    PeftModel.merge_and_unload; non_lora_trainables.bin loaded too. Returns the non-LoRA state dict (original
    names, prefixes stripped) for the caller when the model is a bare LLaMA (nowhere to put the token generator)."""
    return load_adapters(model, lora_dir, merge=True)[1]


# ----------------------------------------------------------------------------------------------------------
# non_lora_trainables.bin

def read_non_lora_trainables(path) -> dict:
    """non_lora_trainables.bin with LLaVA's prefixes stripped (as its builder does): model.mm_projector.0.weight,
    model.vlm_att_query, lm_head.weight, ..."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    state = read_tensors(path)
    return {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in state.items()}


@torch.no_grad()
def load_non_lora_trainables(model, path_or_state) -> dict:
    """Load non_lora_trainables.bin into a LlamaVID: model.mm_projector.* / model.vlm_att_* into the token
    generator (only the keys present: the rest keeps the base checkpoint's), LLM keys (model.embed_tokens.weight,
    lm_head.weight, ...) into the LLM. Into a bare LLaMA only its own keys load; the token generator's are
    returned for the caller. Any other key, or a wrong shape, raises ValueError naming the file and key.
    Returns the state dict read (prefixes stripped)."""
    name = str(path_or_state) if not isinstance(path_or_state, dict) else "non_lora_trainables"
    state = path_or_state if isinstance(path_or_state, dict) else read_non_lora_trainables(path_or_state)
    state = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in state.items()}
    llm = _llm(model)
    llm_params = dict(llm.named_parameters())
    visual = getattr(model, "visual", None)
    visual_names = {}
    if visual is not None:  # the original's name of each of the token generator's parameters
        own = visual.state_dict()
        for ours in own:
            visual_names[next(iter(visual.llamavid_state_dict({ours: own[ours]})))] = ours
        own_visual = own
    targets, unexpected = {}, []
    for key, tensor in state.items():
        if key.startswith(TOKEN_PREFIXES):
            if visual is None or key.endswith("embeddings.position_ids"):
                continue  # for the caller to build the token generator from; a stored arange, rebuilt on the fly
            ours = visual_names.get(key)
            target = own_visual[ours] if ours is not None else None
        elif key.startswith(VISION_PREFIX):
            raise ValueError(f"{name}: {key!r} is a vision tower weight; the vision tower never trains here")
        else:
            ours = hf_to_ours(key)
            if ours is None:
                continue
            if ours is not _UNMAPPED and ours not in llm_params:  # a projection inside a LoRALinear
                ours = ours.replace(".weight", ".base.weight")
            target = llm_params.get(ours) if ours is not _UNMAPPED else None
        if target is None:
            unexpected.append(key)
        else:
            targets[key] = target
    check_state(f"{name} (LLaMA-VID's LLM and token generator; a run of another model size?)",
                {k: state[k] for k in targets}, targets)
    report_mismatch(name, unexpected=unexpected)
    for key, target in targets.items():
        target.copy_(state[key])
    return state


# ----------------------------------------------------------------------------------------------------------
# a LoRA run as one LlamaVID (sample.py --lora DIR --model-base BASE)

def load_lora_model(lora_dir, model_base, vision_path=None, bert_path=None, dtype=torch.float32, device="cpu",
                    merge: bool = True, load_vision: bool = True, download: bool = False):
    """A LlamaVID from a LoRA run: the config.json of lora_dir (else model_base's), the LLM from model_base (a
    Vicuna / LLaMA directory, or a LLaMA-VID checkpoint such as the stage-1 output), the token generator from
    model_base overlaid with lora_dir's non_lora_trainables.bin, then the adapters (merged by default, like the
    original's builder; merge=False keeps LoRALinear layers). Merged, it can be quantised afterwards."""
    lora_dir, model_base = Path(lora_dir), Path(model_base)
    read_adapter_config(lora_dir)  # fail early on a directory that is not a LoRA run
    config_dir = lora_dir if (lora_dir / "config.json").is_file() else model_base
    hf = read_config(config_dir)
    if "mm_hidden_size" not in hf:
        raise ValueError(f"{lora_dir}/config.json has no 'mm_hidden_size': not a LLaMA-VID LoRA run (its "
                         "config.json is written beside the adapters)")
    config = LlamaVIDConfig.from_hf(hf, source=config_dir / "config.json")
    non_lora = read_non_lora_trainables(lora_dir / NON_LORA_FILE) if (lora_dir / NON_LORA_FILE).is_file() else {}
    if bert_path is None and (lora_dir / "vocab.txt").is_file():
        bert_path = lora_dir / "vocab.txt"
    model = load_llamavid(model_base, config, {k: v for k, v in non_lora.items() if k.startswith(TOKEN_PREFIXES)},
                          vision_path, bert_path, dtype, device, load_vision, download)
    load_adapters(model, lora_dir, merge=merge, non_lora=False)
    load_non_lora_trainables(model, {k: v for k, v in non_lora.items() if not k.startswith(TOKEN_PREFIXES)})
    return model.eval()
