"""The decoder against HF transformers' LlamaForCausalLM on tiny random configs, the loader's formats and errors."""
import json

import pytest
import torch

from generate import compiled_block, generate, sample_next
from model import LLaMA, Block

transformers = pytest.importorskip("transformers")


def hf_llama(tmp_path, rope_scaling=None, kv_heads=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_scaling=rope_scaling, tie_word_embeddings=False)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a mix-up of the two norms would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return ref


def save_bin(ref, path, shards=1):
    """The layout transformers 4.31 writes: pytorch_model.bin, or shards + pytorch_model.bin.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    ref.config.to_json_file(path / "config.json")
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return path
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, path / name)
        weight_map.update({k: name for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def assert_close(ours, ref, tol=1e-5):
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max abs difference {diff:.3g} > {tol}"


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 4.0}])
@pytest.mark.parametrize("fmt", ["bin", "bin-sharded", "safetensors-sharded"])
def test_logits_match_hf(tmp_path, rope_scaling, fmt):
    ref = hf_llama(tmp_path, rope_scaling)
    if fmt == "bin":
        save_bin(ref, tmp_path / "ckpt")
    elif fmt == "bin-sharded":
        save_bin(ref, tmp_path / "ckpt", shards=3)
    else:
        ref.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
        assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    ours = LLaMA.from_pretrained(tmp_path / "ckpt")
    tokens = torch.randint(0, 97, (3, 90))  # batch > 1, positions past the rope-scaled range
    with torch.no_grad():
        assert_close(ours(tokens), ref(tokens).logits)


def test_rope_scaling_changes_logits(tmp_path):
    """The linear factor must reach the attention: same weights, different factor, different logits."""
    a = LLaMA.from_pretrained(save_bin(hf_llama(tmp_path), tmp_path / "a"))
    b = LLaMA.from_pretrained(save_bin(hf_llama(tmp_path, {"rope_type": "linear", "factor": 2.0}), tmp_path / "b"))
    tokens = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert (a(tokens) - b(tokens)).abs().max() > 1e-3


def test_padding_mask_matches_hf(tmp_path):
    ref = hf_llama(tmp_path, kv_heads=2)
    ours = LLaMA.from_pretrained(save_bin(ref, tmp_path / "ckpt"))
    tokens = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding, as training batches have it
    with torch.no_grad():
        got, want = ours(tokens, attention_mask=mask), ref(tokens, attention_mask=mask).logits
    assert_close(got[0], want[0])
    assert_close(got[1, :8], want[1, :8])


def test_cached_decoding_equals_full_forward(tmp_path):
    ours = LLaMA.from_pretrained(save_bin(hf_llama(tmp_path, {"rope_type": "linear", "factor": 2.0}), tmp_path / "c"))
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = ours(tokens)
        ours.setup_cache(2, 32)
        steps = [ours(tokens[:, :10], input_pos=torch.arange(10))]  # a prefill chunk, then one token at a time
        for t in range(10, 24):
            steps.append(ours(tokens[:, t:t + 1], input_pos=torch.tensor([t])))
        ours.clear_cache()
    assert_close(torch.cat(steps, dim=1), full)


def test_greedy_generate_matches_hf(tmp_path):
    ref = hf_llama(tmp_path)
    ours = LLaMA.from_pretrained(save_bin(ref, tmp_path / "ckpt"))
    prompt = torch.randint(3, 97, (1, 7))
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 7:]
    got = generate(ours, ours.tok_embeddings(prompt), max_new_tokens=12, eos_id=None)[0]
    assert got.tolist() == want.tolist()


def test_batched_generate_left_padding_equals_single(tmp_path):
    ours = LLaMA.from_pretrained(save_bin(hf_llama(tmp_path), tmp_path / "ckpt"))
    a, b = torch.randint(3, 97, (1, 9)), torch.randint(3, 97, (1, 5))
    with torch.no_grad():
        single = [generate(ours, ours.tok_embeddings(p), 8, eos_id=None)[0] for p in (a, b)]
        padded = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :4] = 0
        batch = generate(ours, ours.tok_embeddings(padded), 8, attention_mask=mask, eos_id=None)
    assert batch[0].tolist() == single[0].tolist() and batch[1].tolist() == single[1].tolist()


def test_generate_stops_at_eos(tmp_path):
    ours = LLaMA.from_pretrained(save_bin(hf_llama(tmp_path), tmp_path / "ckpt"))
    prompt = torch.randint(3, 97, (1, 6))
    free = generate(ours, ours.tok_embeddings(prompt), 10, eos_id=None)[0]
    eos = int(free[3])  # pretend the 4th greedy token is EOS
    stopped = generate(ours, ours.tok_embeddings(prompt), 10, eos_id=eos)[0]
    assert stopped.tolist() == free[:free.tolist().index(eos) + 1].tolist()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are outside the nucleus


# --- errors a user can cause --------------------------------------------------------------------------------

def test_missing_shard_is_named(tmp_path):
    path = save_bin(hf_llama(tmp_path), tmp_path / "ckpt", shards=3)
    (path / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00003.bin"):
        LLaMA.from_pretrained(path)


def test_truncated_file_is_named(tmp_path):
    path = save_bin(hf_llama(tmp_path), tmp_path / "ckpt", shards=2)
    shard = path / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot read weight file .*pytorch_model-00001-of-00002.bin"):
        LLaMA.from_pretrained(path)


def test_wrong_shape_is_listed(tmp_path):
    path = save_bin(hf_llama(tmp_path), tmp_path / "ckpt")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(1)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        LLaMA.from_pretrained(path)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "(5, 5)" in msg
    assert "norm.weight" in msg and "model.extra.weight" in msg


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLaMA.from_pretrained(tmp_path)
    hf_llama(tmp_path).config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        LLaMA.from_pretrained(tmp_path)


def test_chunked_prefill_equals_one_shot(tmp_path):
    ref = hf_llama(tmp_path)
    ours = LLaMA.from_pretrained(save_bin(ref, tmp_path / "ckpt"))
    prompt = torch.randint(3, 97, (1, 23))
    want = ref.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 23:]
    ours.clear_cache()
    got = generate(ours, ours.tok_embeddings(prompt), 6, eos_id=None, prefill_chunk=5)[0]
    assert got.tolist() == want.tolist()


def test_fused_projections_match_hf(tmp_path):
    # LLaMA.fuse() stacks q/k/v and gate/up for inference; grouped-query heads make the split uneven
    ref = hf_llama(tmp_path, kv_heads=2)
    ours = LLaMA.from_pretrained(save_bin(ref, tmp_path / "ckpt")).fuse()
    assert not hasattr(ours.layers[0].attention, "wq") and ours.layers[0].attention.wqkv is not None
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert_close(ours(tokens), ref(tokens).logits)
    prompt = tokens[:1, :23]
    want = ref.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 23:]
    got = generate(ours, ours.tok_embeddings(prompt), 6, eos_id=None, prefill_chunk=5)[0]  # chunks after a cache
    assert got.tolist() == want.tolist()


def test_compiled_prefill_matches_hf(tmp_path):
    # generate(compile=True) prefills through compiled_block() (dynamic shapes: every layer and prompt length),
    # writing the KV cache that the compiled decode steps then read
    ref = hf_llama(tmp_path, kv_heads=2)
    ours = LLaMA.from_pretrained(save_bin(ref, tmp_path / "ckpt")).fuse()
    for length in (23, 31):
        tokens = torch.randint(3, 97, (1, length))
        with torch.no_grad():
            want = ref(tokens).logits[:, -1]
            ours.setup_cache(1, 64)
            got = ours(embeds=ours.tok_embeddings(tokens), input_pos=torch.arange(length), logits_from=length - 1,
                       block_fn=compiled_block(Block))[:, -1]
        assert_close(got, want)
        want_ids = ref.generate(tokens, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours.clear_cache()
        got_ids = generate(ours, ours.tok_embeddings(tokens), 4, eos_id=None, prefill_chunk=10, compile=True)
        assert got_ids[0].tolist() == want_ids[0, length:].tolist()
