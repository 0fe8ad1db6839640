"""Its own file because it rewrites a built model (swaps its nn.Linear layers) instead of defining one, for sample.py,
serve.py and bench.py alike: weight-only int8 (per output channel) and int4 (group-wise) Linear layers for the LLM."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# The recipe is gpt-fast's: weights are stored in low precision and dequantised on the fly; activations stay bf16.
# Decoding a 7B model reads every weight once per token, so halving (int8) or quartering (int4) the bytes read
# is what makes it faster. Prefill is compute bound: it gains nothing (int4 kernels may even be slower there).
#
# int8: symmetric, one scale per output row:   w ~ q * scale,                 q in [-127, 127]
# int4: asymmetric, one (scale, zero) per group of `groupsize` inputs of a row:
#       w ~ (q - 8) * scale + zero,  q in [0, 15],  scale = (max - min) / 15,  zero = min + 8 * scale
# which is the convention torch's int4 kernels (tinygemm) dequantise with.

INT4_KERNEL_GROUPSIZES = (32, 64, 128, 256)  # what torch's int4 matmul kernels accept
DECODE_ROWS = 8192  # an int8 layer with more outputs multiplies a one-token input in slices of this many rows


# ----------------------------------------------------------------------------------------------------------
# the arithmetic: one weight matrix at a time

@torch.no_grad()
def quantize_int8(weight: torch.Tensor, scale_dtype=None):
    """(N, K) float weight -> q int8 (N, K), scale (N,) in scale_dtype (default the weight's dtype).

    The scale is rounded to its storage dtype BEFORE q is computed, so q * scale is exactly what forward uses."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    scale = scale.to(scale_dtype or weight.dtype)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, groupsize: int = 128, param_dtype=None):
    """(N, K) float weight, K a multiple of groupsize -> q uint8 (N, K) with values 0..15, scales (N, K // groupsize),
    zeros (N, K // groupsize), the last two in param_dtype (default the weight's dtype; torch's CUDA kernel wants bf16).
    The parameters are rounded to param_dtype before q is computed, so dequantize_int4 is exactly what runs."""
    N, K = weight.shape
    if K % groupsize:
        raise ValueError(f"int4: in_features {K} is not a multiple of groupsize {groupsize} (pad the weight first)")
    w = weight.float().reshape(N, K // groupsize, groupsize)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(param_dtype or weight.dtype)
    zeros = (lo + 8 * scales.float()).to(param_dtype or weight.dtype)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None]) + 8
    return q.clamp_(0, 15).to(torch.uint8).reshape(N, K), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q (N, K) 0..15, scales / zeros (N, G) -> (N, K) weight; the group size is K // G."""
    N, K = q.shape
    G = scales.shape[1]
    w = (q.float().reshape(N, G, K // G) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(N, K).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K // 2) uint8, two a byte: the even column in the high nibble (the layout torch's
    CUDA _convert_weight_to_int4pack takes)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


# ----------------------------------------------------------------------------------------------------------
# the layers

class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale (+ bias). Under torch.compile the int8 -> bf16 cast fuses into the matmul's load."""

    def __init__(self, in_features, out_features, bias=False, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, device=None) -> "Int8Linear":
        w = linear.weight.to(device) if device is not None else linear.weight
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        mod.weight, mod.scales = quantize_int8(w)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().to(w.device).clone()
        return mod

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    def forward(self, x):
        if x.numel() == x.shape[-1] and self.out_features > DECODE_ROWS:
            # one token (batch-1 decoding): compiled, each slice becomes its own one-row reduction kernel, which
            # decoded faster than whole layers on H100s (docs/LOG.md)
            y = torch.cat([F.linear(x, w.to(x.dtype)) for w in self.weight.split(DECODE_ROWS)], dim=-1)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        y = y * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """Group-wise int4 weights. backend:
      "cuda": torch.ops.aten._weight_int4pack_mm (tinygemm), bf16 activations; weight in the kernel's tiled layout
      "cpu":  torch.ops.aten._weight_int4pack_mm_for_cpu; weight in that kernel's layout
      "dequant": weight packed two a byte (pack_int4), dequantised to the activation dtype, then F.linear
    The kernels' layouts belong to one device: quantise on the device the model runs on.
    in/out features that the kernels cannot take (not a multiple of the group size, of 8 / 16 rows) are zero-padded:
    padded inputs meet zero weights, padded outputs are cut off."""

    def __init__(self, in_features, out_features, groupsize=128, backend="dequant", bias=False,
                 dtype=torch.bfloat16, device=None):
        super().__init__()
        if backend not in ("cuda", "cpu", "dequant"):
            raise ValueError(f"Int4Linear backend {backend!r} is not one of 'cuda', 'cpu', 'dequant'")
        if groupsize < 2 or groupsize % 2:
            raise ValueError(f"int4 groupsize {groupsize} must be an even number >= 2 (128 is usual)")
        if backend != "dequant" and groupsize not in INT4_KERNEL_GROUPSIZES:
            raise ValueError(f"torch's int4 kernels take groupsize {INT4_KERNEL_GROUPSIZES}, not {groupsize}; "
                             "use backend='dequant' for other sizes")
        self.in_features, self.out_features = in_features, out_features
        self.groupsize, self.backend = groupsize, backend
        self.k_pad = _round_up(in_features, groupsize)
        self.n_pad = _round_up(out_features, {"cuda": 8, "cpu": 16, "dequant": 1}[backend])
        # the tiled CUDA layout reads K in tiles of inner_k_tiles * 16; 8 is the fastest that divides K
        self.inner_k_tiles = next(t for t in (8, 4, 2) if self.k_pad % (16 * t) == 0) if backend == "cuda" else 1
        G = self.k_pad // groupsize
        sz_dtype = torch.bfloat16 if backend == "cuda" else dtype
        if backend == "cuda":
            shape, wdtype = (self.n_pad // 8, self.k_pad // (16 * self.inner_k_tiles), 32, self.inner_k_tiles // 2), \
                torch.int32
        else:
            shape, wdtype = (self.n_pad, self.k_pad // 2), torch.uint8
        self.register_buffer("weight", torch.zeros(shape, dtype=wdtype, device=device))
        # (G, N, 2): [..., 0] scales, [..., 1] zeros, the layout the kernels take
        self.register_buffer("scales_and_zeros", torch.zeros(G, self.n_pad, 2, dtype=sz_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, groupsize=128, backend=None, device=None) -> "Int4Linear":
        w = linear.weight.to(device) if device is not None else linear.weight
        backend = backend or int4_backend(w.device, groupsize)
        mod = cls(linear.in_features, linear.out_features, groupsize, backend, linear.bias is not None,
                  w.dtype, w.device)
        w = F.pad(w, (0, mod.k_pad - w.shape[1], 0, mod.n_pad - w.shape[0]))
        q, scales, zeros = quantize_int4(w, groupsize, mod.scales_and_zeros.dtype)
        mod.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        if backend == "cuda":
            mod.weight = torch.ops.aten._convert_weight_to_int4pack(pack_int4(q).contiguous(), mod.inner_k_tiles)
        elif backend == "cpu":
            mod.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        else:
            mod.weight = pack_int4(q)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().to(w.device).clone()
        return mod

    def _matmul(self, x2):  # (M, k_pad) -> (M, n_pad)
        sz = self.scales_and_zeros
        if self.backend == "cuda":
            if not x2.is_cuda:
                raise ValueError("these int4 weights were packed for CUDA; quantise the model on the device it runs on")
            if x2.shape[0] > TINYGEMM_MAX_ROWS:
                # a prefill: the kernel is built for a few rows (decoding) and runs at a few % of the tensor cores'
                # rate on thousands; unpack the weight for this one matmul instead (a bf16 copy, freed right after)
                unpacked = unpack_tinygemm(self.weight, self.n_pad, self.k_pad, self.inner_k_tiles)
                if unpacked is not None:
                    G = sz.shape[0]
                    w = unpacked.to(torch.bfloat16).view(self.n_pad, G, self.groupsize)
                    w.sub_(8).mul_(sz[:, :, 0].t()[..., None]).add_(sz[:, :, 1].t()[..., None])  # in place: one copy
                    return F.linear(x2.to(torch.bfloat16), w.view(self.n_pad, self.k_pad))
            return torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.weight, self.groupsize, sz)
        if self.backend == "cpu":
            if x2.is_cuda:
                raise ValueError("these int4 weights were packed for the CPU; quantise the model on the device it "
                                 "runs on")
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(sz.dtype), self.weight, self.groupsize, sz)
        G = sz.shape[0]
        # under autocast the matmul runs in the autocast dtype: dequantise straight to it, not to float32 first
        dtype = torch.get_autocast_dtype(x2.device.type) if torch.is_autocast_enabled(x2.device.type) else x2.dtype
        q = unpack_int4(self.weight).to(dtype).view(self.n_pad, G, self.groupsize)
        w = (q - 8) * sz[:, :, 0].t().to(dtype)[..., None] + sz[:, :, 1].t().to(dtype)[..., None]
        return F.linear(x2, w.view(self.n_pad, self.k_pad))

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        y = self._matmul(x2).to(x.dtype)
        if self.n_pad != self.out_features:
            y = y[:, :self.out_features]
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @torch.no_grad()
    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The (out, in) weight the layer multiplies by (for tests and debugging; the kernels' layouts are read back
        by multiplying the identity, so this costs one K x K matmul)."""
        sz = self.scales_and_zeros
        q = unpack_int4(self.weight) if self.backend == "dequant" else \
            unpack_tinygemm(self.weight, self.n_pad, self.k_pad, self.inner_k_tiles) if self.backend == "cuda" else None
        if q is not None:
            w = dequantize_int4(q, sz[:, :, 0].t(), sz[:, :, 1].t(), dtype)
        else:
            eye = torch.eye(self.k_pad, dtype=sz.dtype, device=sz.device)
            w = self._matmul(eye).t().to(dtype)
        return w[:self.out_features, :self.in_features]

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, groupsize={self.groupsize}, "
                f"backend={self.backend!r}")


# ----------------------------------------------------------------------------------------------------------
# reading torch's tiled CUDA int4 layout back (for prefill matmuls and dequantize()). The layout is the kernel's
# own; rather than restating it, we let the packing op tell us: it moves each 4-bit value of a tile of 8 rows x
# 16 * inner_k_tiles columns to a fixed place of that tile's output, so packing a tile whose values are the digits
# (base 16) of their own positions reveals the permutation. It is checked on a matrix of many tiles before use.

TINYGEMM_MAX_ROWS = 64  # above this many rows (prefill) the CUDA backend multiplies by the unpacked weight
_TINYGEMM_ORDER = {}


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 (..., n) -> uint8 (..., 8 n): the 4-bit fields of each word, lowest first (bytes little-endian)."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)


def _tinygemm_order(inner_k_tiles: int, device) -> torch.Tensor:
    """For one tile: order[p] = the packed field that holds the value at row-major position p of the tile."""
    n, k = 8, 16 * inner_k_tiles
    pos = torch.arange(n * k, device=device).reshape(n, k)
    src = torch.zeros(n * k, dtype=torch.long, device=device)
    for digit in range(3):  # 8 x 128 = 1024 positions: three base-16 digits
        plane = torch.ops.aten._convert_weight_to_int4pack(pack_int4((pos >> (4 * digit)) & 15), inner_k_tiles)
        src += _nibbles(plane).flatten().long() << (4 * digit)
    return torch.argsort(src)


def unpack_tinygemm(weight: torch.Tensor, n: int, k: int, inner_k_tiles: int):
    """The (n, k) uint8 values 0..15 held in _convert_weight_to_int4pack's layout, or None when the layout cannot
    be read back on this torch build (then callers fall back to the kernel)."""
    key = (str(weight.device), inner_k_tiles)
    if key not in _TINYGEMM_ORDER:
        _TINYGEMM_ORDER[key] = None
        try:
            order = _tinygemm_order(inner_k_tiles, weight.device)
            _TINYGEMM_ORDER[key] = order
            g = torch.Generator().manual_seed(0)
            check = torch.randint(0, 16, (64, 32 * inner_k_tiles * 4), generator=g, dtype=torch.uint8)
            check = check.to(weight.device)
            packed = torch.ops.aten._convert_weight_to_int4pack(pack_int4(check), inner_k_tiles)
            if not torch.equal(unpack_tinygemm(packed, *check.shape, inner_k_tiles), check):
                raise ValueError("the layout is not tile by tile")
        except Exception as e:  # noqa: BLE001 - any failure: keep using the kernel for every matmul
            _TINYGEMM_ORDER[key] = None
            warnings.warn(f"cannot read torch's int4 layout back ({type(e).__name__}: {str(e)[:200]}); prefill "
                          "matmuls run through the int4 kernel")
    order = _TINYGEMM_ORDER[key]
    if order is None:
        return None
    kt = 16 * inner_k_tiles
    tiles = _nibbles(weight).view(n // 8, k // kt, 8 * kt)[..., order]
    return tiles.view(n // 8, k // kt, 8, kt).transpose(1, 2).reshape(n, k)


# ----------------------------------------------------------------------------------------------------------
# choosing the int4 kernel: run it once on a small matrix and compare with the plain dequantised matmul, so a torch
# build whose kernel is missing, has another layout or does not run on this GPU falls back instead of giving garbage

_INT4_PROBED = {}


def int4_backend(device, groupsize=128) -> str:
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
    if kind is None or groupsize not in INT4_KERNEL_GROUPSIZES:
        return "dequant"
    key = (str(device), groupsize)
    if key not in _INT4_PROBED:
        _INT4_PROBED[key] = kind if _int4_kernel_works(device, kind, groupsize) else "dequant"
    return _INT4_PROBED[key]


def _int4_kernel_works(device, kind, groupsize) -> bool:
    op = "_weight_int4pack_mm" if kind == "cuda" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, op):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        dtype = torch.bfloat16
        linear = nn.Linear(2 * groupsize, 48, bias=False)
        linear.weight.data = torch.randn(48, 2 * groupsize, generator=gen).to(device=device, dtype=dtype)
        x = torch.randn(5, 2 * groupsize, generator=gen).to(device=device, dtype=dtype)
        fast = Int4Linear.from_linear(linear, groupsize, backend=kind)(x).float()
        ref = Int4Linear.from_linear(linear, groupsize, backend="dequant")(x).float()
        err = ((fast - ref).norm() / ref.norm()).item()
        if err < 2e-2:
            return True
        warnings.warn(f"torch's int4 kernel on {device} disagrees with the reference (relative error {err:.3g}); "
                      "using dequantise-then-matmul")
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernel
        warnings.warn(f"torch's int4 kernel is unusable on {device} ({type(e).__name__}: {str(e)[:200]}); "
                      "using dequantise-then-matmul")
    return False


# ----------------------------------------------------------------------------------------------------------
# the model

def quantize_linear(linear: nn.Linear, mode: str, groupsize: int = 128, backend=None, device=None) -> nn.Module:
    """One nn.Linear -> its int8 / int4 replacement, built on `device` (default: where the weight is)."""
    if mode == "int8":
        return Int8Linear.from_linear(linear, device=device)
    if mode == "int4":
        return Int4Linear.from_linear(linear, groupsize, backend=backend, device=device)
    raise ValueError(f"quantisation mode {mode!r} is not 'int8' or 'int4'")


@torch.no_grad()
def quantize_model(llm: nn.Module, mode: str = "int8", groupsize: int = 128, include_output: bool = True,
                   backend=None, device=None) -> nn.Module:
    """Replace the nn.Linear layers of an LLM (attention, MLP and, with include_output, the output head) in place.

    One layer at a time, so a 7B model is never held twice: each float weight is dropped as its replacement is made.
    device: quantise there (each Linear's weight is moved there first, e.g. a CPU-loaded bf16 model quantised
    straight onto the GPU; move the remaining embeddings and norms with llm.to(device) afterwards).
    Quantise the LLM only (LlamaVID.llm): the vision tower and Q-Former are compute bound and gain nothing.
    Int4 uses torch's int4 kernel on CUDA / CPU when it works here, else dequantise-then-matmul (backend forces one).
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantisation mode {mode!r} is not 'int8' or 'int4'")
    head = getattr(llm, "output", None)
    # (parent, name) pairs only: holding the Linear modules here would keep every float weight alive to the end
    targets = [(parent, name) for parent in llm.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and (include_output or child is not head)]
    head = None
    for parent, name in targets:
        setattr(parent, name, quantize_linear(getattr(parent, name), mode, groupsize, backend, device))
    llm.quantized = mode  # generate() compiles a quantised model's steps differently
    return llm
