"""LoRA against peft on tiny HF LLaMAs (merged and separate adapters, both file layouts), merge / unmerge, training
that moves only the adapters, quantised bases, and a LLaVA-style LoRA run loaded as a LlamaVID from the fixtures."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import (LoRAConfig, LoRALinear, apply_lora, load_adapters, load_lora_model, load_non_lora_trainables,
                  lora_layers, lora_state_dict, merge_lora, merge_peft_lora, merged_state_dict, quantize_base,
                  save_adapters)
from checkpoint import checkpoint_files, hf_to_ours, iter_tensors, ours_to_hf
from model import LLaMA, LlamaVID, Media
from test_llama import assert_close, hf_llama, save_bin

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(ref, seed=1, **kw):
    """ref wrapped by peft (in place) with random lora_B: peft starts B at zero, which would test nothing."""
    cfg = peft.LoraConfig(**{**dict(r=8, lora_alpha=16, target_modules=HF_TARGETS, task_type="CAUSAL_LM"), **kw})
    model = peft.get_peft_model(ref, cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def base_and_peft(tmp_path_factory):
    """(base checkpoint dir, peft model, adapter dir) of a tiny GQA LLaMA."""
    tmp = tmp_path_factory.mktemp("lora")
    ref = hf_llama(tmp, kv_heads=2)
    base = save_bin(ref, tmp / "base")  # before peft touches ref
    model = peft_model(ref)
    model.save_pretrained(tmp / "adapter")
    return base, model, tmp / "adapter"


def tokens_for(vocab, seed=0, shape=(2, 21)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- against peft

def test_merged_and_separate_adapters_match_peft(base_and_peft):
    base, ref, adapter = base_and_peft
    tokens = tokens_for(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(tokens).logits
        merged = LLaMA.from_pretrained(base)
        merge_peft_lora(merged, adapter)
        assert not lora_layers(merged)  # folded into the weights
        assert_close(merged(tokens), want)
        separate = LLaMA.from_pretrained(base)
        cfg, extra = load_adapters(separate, adapter)
        assert len(lora_layers(separate)) == 7 * ref.config.num_hidden_layers and extra == {}
        assert (cfg.r, cfg.alpha, set(cfg.targets)) == (8, 16.0, {"wq", "wk", "wv", "wo", "w1", "w2", "w3"})
        assert_close(separate(tokens), want)
        # and the base alone is not the answer (the adapters matter)
        assert (LLaMA.from_pretrained(base)(tokens) - want).abs().max() > 1e-3


def test_original_bin_layout_with_adapter_names(base_and_peft, tmp_path):
    """The original's file may be adapter_model.bin with peft's adapter name still in the keys."""
    from safetensors.torch import load_file
    base, ref, adapter = base_and_peft
    state = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in state)
    state = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
             v for k, v in state.items()}
    tmp_path.joinpath("adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    torch.save(state, tmp_path / "adapter_model.bin")
    tokens = tokens_for(ref.config.vocab_size, seed=1)
    ours = LLaMA.from_pretrained(base)
    merge_peft_lora(ours, tmp_path)
    with torch.no_grad():
        assert_close(ours(tokens), ref(tokens).logits)


def test_rslora_and_rank_alpha_patterns_match_peft(tmp_path):
    ref = hf_llama(tmp_path, seed=3)
    base = save_bin(ref, tmp_path / "base")
    model = peft_model(ref, seed=4, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 32})
    model.save_pretrained(tmp_path / "adapter")
    tokens = tokens_for(ref.config.vocab_size, seed=2)
    ours = LLaMA.from_pretrained(base)
    load_adapters(ours, tmp_path / "adapter")
    wq, w2 = ours.layers[0].attention.wq, ours.layers[0].feed_forward.w2
    assert (wq.r, w2.alpha) == (4, 32.0) and math.isclose(w2.scaling, 32 / math.sqrt(8))
    with torch.no_grad():
        assert_close(ours(tokens), model(tokens).logits)


def test_our_adapters_load_in_peft(base_and_peft, tmp_path):
    """save_adapters writes peft's layout: PeftModel.from_pretrained (what the original uses) gives our logits."""
    base, ref, _ = base_and_peft
    ours = LLaMA.from_pretrained(base)
    cfg = LoRAConfig(r=4, alpha=8.0, dropout=0.1, targets=("wq", "wv", "w2"))
    params = apply_lora(ours, cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    save_adapters(ours, tmp_path, cfg, base_model=str(base))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"])) == (4, 8.0, ["down_proj", "q_proj",
                                                                                          "v_proj"])
    fresh = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    tokens = tokens_for(ref.config.vocab_size, seed=3)
    with torch.no_grad():
        assert_close(ours.eval()(tokens), theirs(tokens).logits)
    # and back into a fresh model of ours
    again = LLaMA.from_pretrained(base)
    load_adapters(again, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(again).values(), lora_state_dict(ours).values()))


# ---------------------------------------------------------------------------------------- merge / unmerge

def test_merge_unmerge(base_and_peft):
    base, ref, adapter = base_and_peft
    ours = LLaMA.from_pretrained(base)
    load_adapters(ours, adapter)
    before = {n: m.base.weight.detach().clone() for n, m in lora_layers(ours).items()}
    tokens = tokens_for(ref.config.vocab_size, seed=4)
    with torch.no_grad():
        separate = ours(tokens)
        for name, layer in lora_layers(ours).items():
            layer.merge()
            # hand-computed: W + alpha / r * B @ A, in float64
            want = before[name].double() + 16 / 8 * layer.lora_B.double() @ layer.lora_A.double()
            assert (layer.base.weight.double() - want).abs().max() < 1e-6
        assert_close(ours(tokens), separate)
        for name, layer in lora_layers(ours).items():
            layer.unmerge()
            # float32 rounding of (W + d) - d: within 1e-6 absolute for weights and updates of this size
            assert (layer.base.weight - before[name]).abs().max() <= 1e-6
        assert_close(ours(tokens), separate)
        state = merged_state_dict(ours)  # what a full checkpoint of a LoRA run holds
        merge_lora(ours)
    assert not lora_layers(ours) and set(state) == set(ours.state_dict())
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    with torch.no_grad():
        assert_close(ours(tokens), ref(tokens).logits)


# ---------------------------------------------------------------------------------------------- training

def test_lora_learns_with_base_frozen(tmp_path):
    ref = hf_llama(tmp_path, seed=7)
    with torch.no_grad():  # a head like a trained one's (logits of a few units): at init std 0.02 a frozen head
        ref.lm_head.weight.normal_(0, 0.25)  # caps every logit near 1, and no adapter below it could fit anything
    model = LLaMA.from_pretrained(save_bin(ref, tmp_path / "base"))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    params = apply_lora(model, LoRAConfig(r=8, alpha=16.0, dropout=0.05))
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    data = tokens_for(ref.config.vocab_size, seed=8, shape=(4, 16))
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and robust to a busy machine
    try:
        for step in range(200):
            logits = model(data[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
            loss.backward()
            if step == 0:
                for name, p in model.named_parameters():
                    is_adapter = name.endswith((".lora_A", ".lora_B"))
                    assert (p.grad is not None) == is_adapter, name
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    state = model.state_dict()
    for k, v in base.items():  # bit for bit: layers.0.attention.wq.weight now lives at ...wq.base.weight
        got = state[k] if k in state else state[k.replace(".weight", ".base.weight")]
        assert torch.equal(got, v), k


# ------------------------------------------------------------------------------------------ quantised base

@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base(mode):
    """LoRA over quantize.py's layers: the same output and gradients as over the dequantised float weight,
    including int4 kernels that have no derivative of their own; merging is refused."""
    from quantize import Int4Linear, Int8Linear
    torch.manual_seed(0)
    lin = nn.Linear(256, 48, bias=False)
    q = Int8Linear.from_linear(lin) if mode == "int8" else Int4Linear.from_linear(lin, 64, backend=None)
    layer = LoRALinear(q, r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    w = q.dequantize()
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = layer(x)
    want = x @ w.t() + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()  # hand-written reference
    assert (y - want).abs().max() <= 1e-3 * want.abs().max()
    g = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)
    rx, rA, rB = torch.autograd.grad(want, (x, layer.lora_A, layer.lora_B), g)
    for got, ref in ((gx, rx), (gA, rA), (gB, rB)):
        assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    with pytest.raises(ValueError, match="quantised"):
        layer.merge()


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_quantize_base_trains_adapters_only(base_and_peft, mode):
    base, ref, adapter = base_and_peft
    model = LLaMA.from_pretrained(base)
    params = apply_lora(model, LoRAConfig.tiny())
    quantize_base(model, mode)
    kind = {"bf16": "Linear", "int8": "Int8Linear"}[mode]
    assert all(type(m.base).__name__ == kind for m in lora_layers(model).values())
    assert all(p.dtype == torch.float32 for p in params)  # master weights of the adapters stay float32
    assert type(model.output) is nn.Linear  # the head is not a LoRA base: left alone
    tokens = tokens_for(ref.config.vocab_size, seed=6)
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B")))
    if mode != "bf16":
        with pytest.raises(ValueError, match="quantised"):
            merged_state_dict(model)


# --------------------------------------------------------------------------------------------------- errors

def test_errors_name_the_file_and_key(base_and_peft, tmp_path):
    base, ref, adapter = base_and_peft
    model = LLaMA.from_pretrained(base)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapters(model, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        load_adapters(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"lora_A\.weight.*rank 4"):
        load_adapters(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="adapter_model.safetensors.*target_modules"):
        load_adapters(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapters(model, tmp_path)
    with pytest.raises(ValueError, match="targets"):
        apply_lora(model, LoRAConfig(targets=("nope",)))


# ------------------------------------------------------------------ a LLaVA-style LoRA run of LLaMA-VID

def checkpoint_state(path):
    return {k: v for f in checkpoint_files(path) for k, v in iter_tensors(f)}


def test_non_lora_trainables_load_into_llamavid(fixtures, tmp_path):
    model = LlamaVID.from_pretrained(fixtures / "video")
    stored = checkpoint_state(fixtures / "video")
    g = torch.Generator().manual_seed(0)
    # what LLaVA-style training writes: the trainable non-LoRA parameters under the PeftModel's names
    keys = [k for k in stored if k.startswith(("model.mm_projector.", "model.vlm_att_")) and "position_ids" not in k]
    new = {"base_model.model." + k: torch.randn(stored[k].shape, generator=g) for k in keys}
    torch.save(new, tmp_path / "non_lora_trainables.bin")
    loaded = load_non_lora_trainables(model, tmp_path / "non_lora_trainables.bin")
    assert set(loaded) == set(keys)
    assert torch.equal(model.visual.mm_projector[0].weight, new["base_model.model.model.mm_projector.0.weight"])
    assert torch.equal(model.visual.vlm_att_query, new["base_model.model.model.vlm_att_query"])
    saved = model.visual.llamavid_state_dict()  # every key, through the original's names
    assert all(torch.equal(saved[k], new["base_model.model." + k]) for k in keys)

    bad = dict(new)
    bad["base_model.model.model.vlm_att_bogus.weight"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=r"bad\.bin.*model\.vlm_att_bogus\.weight"):
        load_non_lora_trainables(model, tmp_path / "bad.bin")
    bad = {"base_model.model.model.mm_projector.0.weight": torch.zeros(3, 3)}
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=r"model\.mm_projector\.0\.weight.*\(3, 3\)"):
        load_non_lora_trainables(model, tmp_path / "bad.bin")


def test_lora_run_loads_as_llamavid(fixtures, tmp_path):
    """A LoRA run over a plain Vicuna: base = the fixture's LLM alone, the token generator only in
    non_lora_trainables.bin. With peft's zero B the model is the fixture's (the original's logits); with random B
    the merged LLM equals peft's merge_and_unload."""
    from conftest import load_case
    from media import preprocess_frames
    meta, case = load_case(fixtures, "video_single")
    ckpt = fixtures / meta["checkpoint"]
    hf = json.loads((ckpt / "config.json").read_text())
    stored = checkpoint_state(ckpt)
    llm_keys = {k: v for k, v in stored.items() if isinstance(hf_to_ours(k), str)}
    base = tmp_path / "vicuna"
    base.mkdir()
    torch.save(llm_keys, base / "pytorch_model.bin")
    (base / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if not k.startswith("mm_")}))

    cfg = transformers.LlamaConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                                   intermediate_size=hf["intermediate_size"],
                                   num_hidden_layers=hf["num_hidden_layers"],
                                   num_attention_heads=hf["num_attention_heads"],
                                   num_key_value_heads=hf.get("num_key_value_heads"), rms_norm_eps=hf["rms_norm_eps"],
                                   max_position_embeddings=hf["max_position_embeddings"], tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM(cfg)
    ref.load_state_dict({k: v for k, v in llm_keys.items() if "rotary_emb" not in k})
    lora = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS)).eval()
    visual = {"base_model.model." + k: v for k, v in stored.items() if k.startswith(("model.mm_projector.",
                                                                                      "model.vlm_att_"))}
    for name in ("zero", "random"):
        run = tmp_path / name
        if name == "random":
            with torch.no_grad():
                for n, p in lora.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.05)
        lora.save_pretrained(run)
        (run / "config.json").write_text(json.dumps(hf))
        torch.save(visual, run / "non_lora_trainables.bin")

    kw = dict(vision_path=fixtures / "eva_vit_g.pth", bert_path=fixtures / "bert-base-uncased")
    model = load_lora_model(tmp_path / "zero", base, **kw)
    media = [Media("video", pixels=preprocess_frames(case["frames"], model.image_size))]
    with torch.no_grad():
        logits, _ = model(case["input_ids"], media, [meta["guided_prompts"][0]])
    want = case["logits"]
    assert_close(logits[:, -want.shape[1]:], want, 1e-4 * max(1.0, want.abs().max().item()))

    model = load_lora_model(tmp_path / "random", base, load_vision=False, **kw)
    merged = lora.merge_and_unload().state_dict()
    for k, v in model.llm.state_dict().items():
        assert_close(v, merged[ours_to_hf(k)], 1e-6)


def test_llamavid_lora_run_saves_in_the_original_layout(fixtures, tmp_path):
    """A stage-2 LoRA run of ours (LLM adapters + the token generator training): its non_lora_trainables.bin has the
    original checkpoint's names under LLaVA's prefix, and the run reloads merged with the logits it had unmerged."""
    from conftest import load_case
    from media import preprocess_frames
    meta, case = load_case(fixtures, "video_single")
    ckpt = fixtures / meta["checkpoint"]
    model = LlamaVID.from_pretrained(ckpt)
    model.requires_grad_(False)
    model.visual.requires_grad_(True)  # train.py's set_trainable, stage 2, then apply_lora freezes the LLM base
    cfg = LoRAConfig.tiny(r=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in apply_lora(model, cfg) + list(model.visual.mm_projector.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    save_adapters(model, tmp_path, cfg)
    (tmp_path / "config.json").write_text(json.dumps(model.hf_config))
    written = torch.load(tmp_path / "non_lora_trainables.bin", weights_only=True)
    trainable = {k for k in checkpoint_state(ckpt) if k.startswith(("model.mm_projector.", "model.vlm_att_"))
                 and "position_ids" not in k}
    assert set(written) == {"base_model.model." + k for k in trainable}
    media = [Media("video", pixels=preprocess_frames(case["frames"], model.image_size))]
    prompts = [meta["guided_prompts"][0]]
    with torch.no_grad():
        want, _ = model.eval()(case["input_ids"], media, prompts)
        reloaded = load_lora_model(tmp_path, ckpt, vision_path=fixtures / "eva_vit_g.pth",
                                   bert_path=fixtures / "bert-base-uncased")
        got, _ = reloaded(case["input_ids"], media, prompts)
    assert not lora_layers(reloaded)
    assert_close(got, want, 1e-5 * max(1.0, want.abs().max().item()))
