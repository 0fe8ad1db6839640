"""tokens.py against the fixtures the original LLaMA-VID wrote, and the Q-Former against HF transformers'
InstructBlipQFormerModel on tiny random configs."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import case_names, load_case  # noqa: E402
from tokens import QFormerConfig, TokenConfig, VisualTokenizer, WordPiece  # noqa: E402


def load_llamavid(ckpt_dir: Path):
    """(state dict of the token generator's shards, config.json) of a LLaMA-VID checkpoint directory."""
    weight_map = json.loads((ckpt_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shards = sorted({f for k, f in weight_map.items() if ".vlm_att_" in k or ".mm_projector." in k})
    sd = {}
    for f in shards:
        sd.update(torch.load(ckpt_dir / f, map_location="cpu", weights_only=True))
    return sd, json.loads((ckpt_dir / "config.json").read_text())


def token_cases(fixtures):
    out = []
    for name in case_names(fixtures):
        meta = json.loads((fixtures / "cases" / f"{name}.json").read_text())
        if "vlm_tokens" in meta.get("tensors", {}):
            out.append(name)
    return out


def checkpoint_dir(fixtures, prefer):
    """The fixture checkpoint named prefer, else the first the MANIFEST lists."""
    names = json.loads((fixtures / "MANIFEST.json").read_text())["checkpoints"]
    return fixtures / (prefer if prefer in names else next(iter(names)))


def max_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


# ----------------------------------------------------------------------------- WordPiece

def test_wordpiece_cases(fixtures):
    text = json.loads((fixtures / "cases" / "text.json").read_text())
    wp = WordPiece(fixtures / "bert-base-uncased" / "vocab.txt")
    assert wp.dec_id == text["dec_token_id"]
    assert wp.encode("[DEC]") == [text["dec_token_id"]]
    for case in text["wordpiece"]:
        ids, mask = wp(case["texts"])
        assert ids.tolist() == case["input_ids"], case["texts"]
        assert mask.tolist() == case["attention_mask"], case["texts"]


def test_wordpiece_missing_vocab(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        WordPiece(tmp_path / "vocab.txt")


# ----------------------------------------------------------------------------- the original's vlm_tokens

def test_vlm_tokens_match_original(fixtures):
    names = token_cases(fixtures)
    assert names, "fixture set has no case with vlm_tokens"
    checked = 0
    for name in names:
        meta, t = load_case(fixtures, name)
        if "features" in t:  # long video: the extractor's features; the model gets them without cls
            feats, long_video = t["features"][:, 1:], True
        elif "vision_features" in t:
            feats, long_video = t["vision_features"], False
        else:
            continue  # only pixels: covered by test_vlm_tokens_from_pixels
        sd, cfg = load_llamavid(fixtures / meta["checkpoint"])
        vt = VisualTokenizer.from_llamavid(sd, cfg, bert_path=fixtures / "bert-base-uncased").eval()
        with torch.no_grad():
            out = vt(feats, meta["guided_prompts"][0], long_video=long_video)
        ref = t["vlm_tokens"]
        assert out.shape == ref.shape, name
        assert max_err(out, ref) <= 1e-5, name
        checked += 1
    assert checked


def test_vlm_tokens_from_pixels(fixtures):
    """Cases that hold pixels but no vision features (multi-turn training): EVA from vision.py first."""
    vision = pytest.importorskip("vision", reason="vision.py not written yet")
    checked = 0
    for name in token_cases(fixtures):
        meta, t = load_case(fixtures, name)
        if "pixels" not in t or "vision_features" in t or "features" in t:
            continue
        sd, cfg = load_llamavid(fixtures / meta["checkpoint"])
        size = int(cfg["image_processor"].rsplit("-", 1)[-1])
        eva = vision.EVAViT.from_lavis(str(fixtures / "eva_vit_g.pth"), img_size=size).eval()
        vt = VisualTokenizer.from_llamavid(sd, cfg, bert_path=fixtures / "bert-base-uncased").eval()
        with torch.no_grad():
            out = vt(eva(t["pixels"]), meta["guided_prompts"][0])
        ref = t["vlm_tokens"]
        assert out.shape == ref.shape, name
        assert max_err(out, ref) <= 1e-5, name
        checked += 1
    if not checked:
        pytest.skip("no pixels-only case with vlm_tokens")


# ----------------------------------------------------------------------------- Q-Former vs HF

def hf_to_lavis(key):
    return (key.replace(".attention.attention.", ".attention.self.")
            .replace(".crossattention.attention.", ".crossattention.self.")
            .replace("embeddings.layernorm.", "embeddings.LayerNorm."))


def random_hf_qformer(layers=3, heads=4, hidden=32, vision=24, freq=2, seed=0):
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel
    torch.manual_seed(seed)
    cfg = InstructBlipQFormerConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=48, max_position_embeddings=40,
                                    encoder_hidden_size=vision, cross_attention_frequency=freq)
    hf = InstructBlipQFormerModel(cfg).eval()
    with torch.no_grad():  # HF inits LayerNorms to (1, 0) and biases to 0: randomise everything
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return hf


@pytest.mark.parametrize("layers,heads,freq", [(3, 4, 2), (4, 2, 3), (2, 8, 1)])
def test_qformer_matches_hf(layers, heads, freq):
    pytest.importorskip("transformers")
    hidden, vision, n_query, llm = 32, 24, 5, 16
    hf = random_hf_qformer(layers, heads, hidden, vision, freq)
    torch.manual_seed(1)
    query = torch.randn(1, n_query, hidden)
    sd = {"model.vlm_att_encoder.bert." + hf_to_lavis(k): v for k, v in hf.state_dict().items()}
    sd.update({"model.vlm_att_query": query,
               "model.vlm_att_projector.weight": torch.randn(vision, hidden),
               "model.vlm_att_projector.bias": torch.randn(vision),
               "model.vlm_att_key_projector.weight": torch.randn(vision, vision),
               "model.vlm_att_key_projector.bias": torch.randn(vision),
               "model.vlm_att_val_projector.weight": torch.randn(llm, vision),
               "model.vlm_att_val_projector.bias": torch.randn(llm),
               "model.mm_projector.0.weight": torch.randn(llm, vision), "model.mm_projector.0.bias": torch.randn(llm),
               "model.mm_projector.2.weight": torch.randn(llm, llm), "model.mm_projector.2.bias": torch.randn(llm)})
    vt = VisualTokenizer.from_llamavid(sd, {"bert_type": "qformer"}, num_heads=heads).eval()
    assert vt.cfg.qformer.cross_attention_freq == freq and vt.cfg.qformer.num_layers == layers

    B, L, M = 3, 7, 11
    ids = torch.randint(1, 50, (B, L))
    text_mask = torch.ones(B, L, dtype=torch.long)
    text_mask[1, 4:] = 0  # right padding, as the WordPiece batch has it
    text_mask[2, 2:] = 0
    ids[text_mask == 0] = 0
    image = torch.randn(B, M, vision)
    queries = query.expand(B, -1, -1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.cat([torch.ones(B, n_query, dtype=torch.long), text_mask], 1),
                 query_embeds=queries, encoder_hidden_states=image).last_hidden_state[:, :n_query]
        out = vt.qformer(queries, ids, text_mask, image)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_instructblip_init(tmp_path):
    """A tiny instruct_blip_*_trimmed.pth: the Q-Former loads and computes what HF computes with it."""
    pytest.importorskip("transformers")
    hidden, vision, n_query = 32, 24, 5
    hf = random_hf_qformer(4, 4, hidden, vision, 2, seed=3)
    model = {"Qformer.bert." + hf_to_lavis(k): v for k, v in hf.state_dict().items()}
    model["Qformer.bert.embeddings.position_ids"] = torch.arange(40)[None]
    model.update({"ln_vision.weight": torch.randn(vision), "ln_vision.bias": torch.randn(vision),
                  "query_tokens": torch.randn(1, n_query, hidden),
                  "llm_proj.weight": torch.randn(16, hidden), "llm_proj.bias": torch.randn(16)})
    path = tmp_path / "instruct_blip_tiny_trimmed.pth"
    torch.save({"model": model}, path)

    qcfg = QFormerConfig(vocab_size=50, max_position=40, hidden_size=hidden, num_layers=4, num_heads=4,
                         intermediate_size=48, vision_width=vision, num_query=n_query)
    vt = VisualTokenizer.from_instructblip(path, TokenConfig(llm_dim=16, vision_width=vision, qformer=qcfg)).eval()
    assert torch.equal(vt.vlm_att_query, model["query_tokens"])
    assert torch.equal(vt.vlm_att_ln.weight, model["ln_vision.weight"])
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    image = torch.randn(2, 9, vision)
    queries = model["query_tokens"].expand(2, -1, -1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones(2, n_query + 6, dtype=torch.long), query_embeds=queries,
                 encoder_hidden_states=image).last_hidden_state[:, :n_query]
        out = vt.qformer(queries, ids, mask, image)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())

    bad = dict(model)
    bad["Qformer.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    torch.save({"model": bad}, path)
    with pytest.raises(ValueError, match="Qformer.bert.encoder.layer.0.attention.self.rotary.weight"):
        VisualTokenizer.from_instructblip(path, TokenConfig(llm_dim=16, vision_width=vision, qformer=qcfg))


# ----------------------------------------------------------------------------- long-video blocks

def test_long_video_blocks_equal_one_batch(fixtures):
    sd, cfg = load_llamavid(checkpoint_dir(fixtures, "long"))
    vt = VisualTokenizer.from_llamavid(sd, cfg, bert_path=fixtures / "bert-base-uncased").eval()
    vt.cfg.long_video_block = 3  # blocks that split prompts and frames unevenly
    torch.manual_seed(0)
    n_patch = 16
    feats = torch.randn(7, n_patch, vt.cfg.vision_width)
    prompts = ["Why are they hurrying?", "Who is driving the car at night?"]
    with torch.no_grad():
        blocked = vt(feats, prompts, long_video=True)
        vt.cfg.long_video_block = len(feats) * len(prompts)
        whole = vt(feats, prompts, long_video=True)
    assert blocked.shape == whole.shape == (2, 7 * 2, vt.cfg.llm_dim)
    assert (blocked - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()


# ----------------------------------------------------------------------------- bad state dicts

def test_bad_state_dicts(fixtures):
    sd, cfg = load_llamavid(checkpoint_dir(fixtures, "video"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        VisualTokenizer.from_llamavid({"lm_head.weight": torch.zeros(2, 2)}, cfg)

    vt = VisualTokenizer.from_llamavid(sd, cfg)
    extra = {"model.vlm_att_bert_proj.weight": torch.zeros(3, 3), **sd,
             "model.vlm_att_encoder.bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="model.vlm_att_bert_proj.weight"):
        vt.load_state_dict_from_llamavid(extra)

    key = "model.vlm_att_key_projector.weight"
    wrong = dict(sd)
    wrong[key] = torch.zeros(wrong[key].shape[0] + 1, wrong[key].shape[1])
    with pytest.raises(ValueError, match=key):
        vt.load_state_dict_from_llamavid(wrong)

    missing = dict(sd)
    gone = "model.vlm_att_encoder.bert.encoder.layer.0.crossattention.self.value.bias"
    del missing[gone]
    with pytest.raises(ValueError, match=gone):
        vt.load_state_dict_from_llamavid(missing)

    with pytest.raises(ValueError, match="compress_type"):
        TokenConfig(compress_type="grid")
