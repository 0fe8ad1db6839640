"""Weight-only int8 / int4 layers against hand-computed quantisation and the float layers they replace, on the CPU;
a quantised tiny LLaMA against the float one."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from generate import generate
from model import LLaMA, LLaMAConfig
from quantize import (Int4Linear, Int8Linear, dequantize_int4, int4_backend, pack_int4, quantize_int4, quantize_int8,
                      quantize_linear, quantize_model, unpack_int4)


def _linear(n_in, n_out, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    return lin


# ----------------------------------------------------------------------------------------------------------- int8

def test_int8_weight_by_hand():
    lin = _linear(172, 48)
    w = lin.weight.detach()
    q, scale = quantize_int8(w)
    s = w.abs().amax(dim=1) / 127  # the rule: the largest |w| of a row maps to 127
    assert torch.equal(scale, s)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.equal(q.float(), torch.round(w / s[:, None]))
    deq = Int8Linear.from_linear(lin).dequantize()
    assert torch.equal(deq, torch.round(w / s[:, None]) * s[:, None])
    # rounding to the nearest step: never more than half a step off (plus float rounding of the product)
    assert ((w - deq).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bias", [False, True])
def test_int8_layer_output(bias):
    lin = _linear(172, 48, bias)
    mod = Int8Linear.from_linear(lin)
    x = torch.randn(2, 5, 172)
    w = lin.weight.detach()
    s = w.abs().amax(dim=1) / 127
    w_hand = torch.round(w / s[:, None]) * s[:, None]
    y = mod(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, F.linear(x, w_hand, lin.bias), atol=1e-5, rtol=1e-5)
    # against the float layer: |sum_k x_k (w_k - deq_k)| <= s_n / 2 * sum_k |x_k| for every output n
    bound = (x.abs().sum(-1, keepdim=True) * s / 2)
    assert ((y - lin(x)).abs() <= bound + 1e-5).all()


@pytest.mark.parametrize("shape", [(1, 1, 40), (1, 40), (3, 40)])
def test_int8_one_token_in_slices(shape, monkeypatch):
    # a one-token input of a layer with more outputs than DECODE_ROWS is multiplied slice by slice: each output is
    # still its own row's dot product (set DECODE_ROWS small so a small layer has a short last slice)
    import quantize
    monkeypatch.setattr(quantize, "DECODE_ROWS", 16)
    lin = _linear(40, 37, bias=True)
    mod = Int8Linear.from_linear(lin)
    x = torch.randn(*shape)
    w = lin.weight.detach()
    s = w.abs().amax(dim=1) / 127
    torch.testing.assert_close(mod(x), F.linear(x, torch.round(w / s[:, None]) * s[:, None], lin.bias),
                               atol=1e-5, rtol=1e-5)


def test_int8_keeps_bf16():
    lin = _linear(64, 32).to(torch.bfloat16)
    mod = Int8Linear.from_linear(lin)
    assert mod.scales.dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), mod.dequantize())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2  # bf16 rounding only


# ----------------------------------------------------------------------------------------------------------- int4

def _int4_by_hand(w, groupsize):
    """scale = (max - min) / 15, zero = min + 8 scale, q = round((w - zero) / scale) + 8, w' = (q - 8) scale + zero."""
    N, K = w.shape
    g = w.reshape(N, K // groupsize, groupsize)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    z = lo + 8 * s
    q = (torch.round((g - z) / s) + 8).clamp(0, 15)
    return q.reshape(N, K), ((q - 8) * s + z).reshape(N, K), s.squeeze(-1)


@pytest.mark.parametrize("groupsize", [32, 128])
def test_int4_weight_by_hand(groupsize):
    w = _linear(256, 48).weight.detach()
    q_hand, deq_hand, s = _int4_by_hand(w, groupsize)
    q, scales, zeros = quantize_int4(w, groupsize)
    assert q.dtype == torch.uint8 and int(q.max()) == 15 and int(q.min()) == 0
    assert torch.equal(q.float(), q_hand)
    torch.testing.assert_close(dequantize_int4(q, scales, zeros), deq_hand, atol=1e-6, rtol=0)
    # half a step at most, per group
    err = (w - deq_hand).reshape(48, -1, groupsize).abs().amax(-1)
    assert (err <= s / 2 * (1 + 1e-5) + 1e-7).all()


def test_int4_packing_round_trip():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = pack_int4(q)
    # two a byte, the even column in the high nibble: 0x12, 0xF0 / 0x78, 0x9A
    assert packed.tolist() == [[0x12, 0xF0], [0x78, 0x9A]]
    assert torch.equal(unpack_int4(packed), q)
    big = torch.randint(0, 16, (40, 384), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(big)), big)


@pytest.mark.parametrize("backend", ["dequant", "cpu"])
@pytest.mark.parametrize("shape,groupsize", [((256, 48), 128), ((172, 600), 32), ((64, 172), 128)])
def test_int4_layer_output(backend, shape, groupsize):
    if backend == "cpu" and int4_backend("cpu", groupsize) != "cpu":
        pytest.skip("torch's CPU int4 kernel is not available in this build")
    n_in, n_out = shape
    lin = _linear(n_in, n_out, bias=True)
    mod = Int4Linear.from_linear(lin, groupsize, backend=backend)
    # inputs not a multiple of the group size are zero-padded: the padded columns join the last group
    k_pad = -(-n_in // groupsize) * groupsize
    w_pad = F.pad(lin.weight.detach(), (0, k_pad - n_in))
    _, deq_hand, s = _int4_by_hand(w_pad, groupsize)
    deq_hand = deq_hand[:, :n_in]
    torch.testing.assert_close(mod.dequantize(), deq_hand, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 4, n_in)
    y = mod(x)
    assert y.shape == (3, 4, n_out)
    torch.testing.assert_close(y, F.linear(x, deq_hand, lin.bias), atol=1e-4, rtol=1e-4)
    # against the float layer: at most half a step of each group times |x|
    s_col = s.repeat_interleave(groupsize, dim=1)[:, :n_in]  # (N, K) step of each weight
    bound = (x.abs() @ s_col.t()) / 2
    assert ((y - lin(x)).abs() <= bound * (1 + 1e-4) + 1e-4).all()


def test_int4_kernel_and_reference_agree_in_bf16():
    if int4_backend("cpu", 128) != "cpu":
        pytest.skip("torch's CPU int4 kernel is not available in this build")
    lin = _linear(256, 64).to(torch.bfloat16)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    fast = Int4Linear.from_linear(lin, 128, backend="cpu")(x).float()
    ref = Int4Linear.from_linear(lin, 128, backend="dequant")(x).float()
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-2


def test_bad_arguments_raise_value_error():
    lin = _linear(64, 32)
    with pytest.raises(ValueError, match="int8"):
        quantize_linear(lin, "int3")
    with pytest.raises(ValueError, match="groupsize"):
        Int4Linear(64, 32, groupsize=48, backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        Int4Linear(64, 32, backend="tpu")
    with pytest.raises(ValueError, match="int8"):
        quantize_model(LLaMA(LLaMAConfig.tiny()), "fp8")


# --------------------------------------------------------------------------------------------------------- a model

def _tiny(seed=0):
    torch.manual_seed(seed)
    return LLaMA(LLaMAConfig.tiny()).eval()


def test_quantize_model_replaces_linears():
    model = _tiny()
    q = quantize_model(copy.deepcopy(model), "int8", include_output=False)
    assert not any(isinstance(m, nn.Linear) for n, m in q.named_modules() if n != "output")
    assert isinstance(q.output, nn.Linear)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == n_linear - 1
    q4 = quantize_model(copy.deepcopy(model), "int4", groupsize=32)
    assert sum(isinstance(m, Int4Linear) for m in q4.modules()) == n_linear


# Tolerances, derived. The tiny model's Linear weights are uniform on +-a (PyTorch's default init), std a / sqrt(3).
# int8: step s = max|w| / 127 ~ a / 127, rounding error std s / sqrt(12): relative to the weights 1 / (127 * 2) ~ 0.4 %
# per layer; we allow 2 % on the logits. int4: s = (max - min) / 15 ~ 2a / 15, relative error 2 / (15 * 2) ~ 6.7 %
# per layer; we allow 15 %. Greedy steps flip where the top two logits are closer than that noise, which on this
# random model (top-1 margin ~ a quarter of the logits' std) happens for a few per cent (int8) / ~10 % (int4).
@pytest.mark.parametrize("mode,groupsize,rel_tol,agree", [("int8", 128, 0.02, 0.95), ("int4", 32, 0.15, 0.75),
                                                          ("int4", 128, 0.15, 0.75)])
def test_quantised_tiny_llama_is_close(mode, groupsize, rel_tol, agree):
    model = _tiny()
    q = quantize_model(copy.deepcopy(model), mode, groupsize)
    prompts = torch.randint(0, model.cfg.vocab_size, (8, 12))
    with torch.no_grad():
        ref_logits, q_logits = model(tokens=prompts), q(tokens=prompts)
        rel = ((q_logits - ref_logits).norm() / ref_logits.norm()).item()
        assert rel < rel_tol, f"{mode}: logits relative error {rel:.3f} >= {rel_tol}"
        # greedy continuation of the float model; the quantised one, fed the same tokens, picks the same next token
        ref_tokens = generate(model, model.tok_embeddings(prompts), 24, eos_id=None)
        forced = q(tokens=torch.cat([prompts, ref_tokens], 1))[:, prompts.shape[1] - 1:-1].argmax(-1)
        same = (forced == ref_tokens).float().mean().item()
        assert same >= agree, f"{mode}: greedy steps agree {same:.2f} < {agree}"
        if mode == "int8":  # free-running (a flip changes the rest of the row): still mostly the same text
            q_tokens = generate(q, q.tok_embeddings(prompts), 24, eos_id=None)
            assert (q_tokens == ref_tokens).float().mean().item() >= 0.75


def test_quantised_model_generates_in_bf16():
    model = _tiny().to(torch.bfloat16)
    model.inv_freq = model._inv_freq()
    for mode in ("int8", "int4"):
        q = quantize_model(copy.deepcopy(model), mode, groupsize=32)
        out = generate(q, q.tok_embeddings(torch.randint(0, 600, (2, 7))), 5, eos_id=None)
        assert out.shape == (2, 5) and out.dtype == torch.long
