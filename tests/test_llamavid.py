"""LlamaVID end to end on the fixture checkpoints: our logits, loss and greedy ids against the original's."""
import json
import random

import pytest
import torch
from PIL import Image

from conftest import case_names, fixtures_path, load_case
from data import Tokenizer, preprocess, tokenize_with_images
from model import LlamaVID, Media
from media import preprocess_frames, preprocess_images

CASES = case_names(fixtures_path()) if (fixtures_path() / "MANIFEST.json").exists() else []
_models = {}


def get_model(fixtures, name):
    if name not in _models:
        _models[name] = LlamaVID.from_pretrained(fixtures / name)
    return _models[name]


def media_of(model, fixtures, meta, tensors, key="frames"):
    """The case's raw input run through our preprocessing (image file, decoded frames or cached features)."""
    if "features" in tensors:  # a movie: EVA's features, cls included (the model drops it)
        return Media("movie", features=tensors["features"])
    if key in tensors:
        return Media("video", pixels=preprocess_frames(tensors[key], model.image_size))
    image = Image.open(fixtures / "cases" / meta["image"]).convert("RGB")
    return Media("image", pixels=preprocess_images([image], model.image_size))


def assert_close(got, want, tol):
    scale = max(want.abs().max().item(), 1.0)
    diff = (got - want).abs().max().item()
    assert diff <= tol * scale, f"max abs difference {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", CASES)
def test_case_matches_original(fixtures, name):
    meta, t = load_case(fixtures, name)
    model = get_model(fixtures, meta["checkpoint"])
    tok = Tokenizer(fixtures / meta["checkpoint"])
    n_last = meta["logits_last"]

    if "sources" in meta:  # a padded training batch
        rng = random.Random(meta.get("python_random_seed"))
        ids, labels, prompts = zip(*[preprocess(s, tok, meta["template"], rng=rng) for s in meta["sources"]])
        # sample i's frames are tensor frames_i; sample 0's are video_single's (the fixture's note says so)
        frames = [t.get(f"frames_{i}") for i in range(len(ids))]
        frames[0] = load_case(fixtures, "video_single")[1]["frames"] if frames[0] is None else frames[0]
        media = [Media("video", pixels=preprocess_frames(f, model.image_size)) for f in frames]
        L = t["input_ids"].shape[1]
        input_ids = torch.stack([torch.cat([x, x.new_zeros(L - len(x))]) for x in ids])
        label_ids = torch.stack([torch.cat([x, x.new_full((L - len(x),), -100)]) for x in labels])
        assert torch.equal(input_ids, t["input_ids"]) and torch.equal(label_ids, t["labels"])
        with torch.no_grad():
            logits, loss = model(input_ids, media, list(prompts), attention_mask=t["attention_mask"],
                                 labels=label_ids)
    elif "source" in meta:  # one training sample
        rng = random.Random(meta.get("python_random_seed"))
        ids, labels, prompts = preprocess(meta["source"], tok, meta["template"], rng=rng)
        assert torch.equal(ids, t["input_ids"][0]) and torch.equal(labels, t["labels"][0])
        with torch.no_grad():
            logits, loss = model(ids[None], [media_of(model, fixtures, meta, t)], [prompts], labels=labels[None])
    else:
        ids = torch.tensor(tokenize_with_images(meta["prompt"], tok))
        assert torch.equal(ids, t["input_ids"][0])
        media, prompts = [media_of(model, fixtures, meta, t)], [meta["guided_prompts"][0]]
        with torch.no_grad():
            logits, loss = model(ids[None], media, prompts)
        greedy = model.generate(ids[None], media, prompts, max_new_tokens=len(t["greedy_ids"]))[0]
        want = t["greedy_ids"].tolist()
        assert greedy.tolist()[:len(want)] == want

    assert logits.shape[1] == meta["logits_full_length"]
    assert_close(logits[:, -n_last:], t["logits"], 1e-4)
    if "loss" in t:
        assert abs(loss.item() - t["loss"].item()) <= 1e-4 * max(1.0, t["loss"].item())


def test_visual_tokens_reach_the_logits(fixtures):
    """A different image must change the answer's logits (the splice is not a no-op)."""
    meta, t = load_case(fixtures, "image_single")
    model = get_model(fixtures, meta["checkpoint"])
    ids = t["input_ids"]
    pixels = media_of(model, fixtures, meta, t)
    with torch.no_grad():
        a, _ = model(ids, [pixels], [meta["guided_prompts"][0]])
        b, _ = model(ids, [Media(pixels.kind, pixels=pixels.pixels.flip(-1))], [meta["guided_prompts"][0]])
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


def test_every_variant_loads_by_config_alone(fixtures):
    manifest = json.loads((fixtures / "MANIFEST.json").read_text())
    for name, opts in manifest["checkpoints"].items():
        model = get_model(fixtures, name)
        assert model.visual.cfg.compress_type == opts["compress_type"]
        assert model.llm.cfg.rope_scaling == opts["rope_scaling"]
        assert model.image_size == int(opts["image_processor"].rsplit("-", 1)[-1])


def test_checkpoint_errors(fixtures, tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("LLAMAVID_CACHE", str(tmp_path / "cache"))  # no downloaded EVA weights to find
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # nor a cached bert-base-uncased
    src = fixtures / "video"
    bad = tmp_path / "ckpt"
    shutil.copytree(src, bad)
    (bad / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        LlamaVID.from_pretrained(bad)
    shutil.copy(src / "tokenizer.model", bad / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="eva_vit_g.pth"):  # no tower beside it, none given
        LlamaVID.from_pretrained(bad, bert_path=fixtures / "bert-base-uncased")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        LlamaVID.from_pretrained(bad, vision_path=fixtures / "eva_vit_g.pth")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mm_hidden_size"] += 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mm_hidden_size"):
        LlamaVID.from_pretrained(bad, vision_path=fixtures / "eva_vit_g.pth", bert_path=fixtures / "bert-base-uncased")


def test_zero_context_zeroes_only_the_context_tokens(fixtures):
    """eval.py --zero-context's ablation, over a padded batch of two videos: in the spliced embeddings every
    frame's first visual token (its context token) is zero and everything else is what it is without it."""
    from eval import zero_context
    from model import IMAGE_TOKEN_INDEX
    meta, t = load_case(fixtures, "video_single")
    model = get_model(fixtures, meta["checkpoint"])
    ids = t["input_ids"]
    video = media_of(model, fixtures, meta, t)
    media = [video, Media("video", pixels=video.pixels.flip(-1))]
    prompts = [meta["guided_prompts"][0]] * 2
    batch = torch.cat([ids, ids])
    with torch.no_grad():
        normal, _, _ = model.embed(batch, media, prompts)
        with zero_context(model):
            ablated, _, _ = model.embed(batch, media, prompts)
        again, _, _ = model.embed(batch, media, prompts)
    slot = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().item()
    per_frame = model.tokens_per_frame()
    n_visual = media[0].frames * per_frame
    visual = torch.zeros(normal.shape[1], dtype=torch.bool)
    visual[slot:slot + n_visual] = True
    context = torch.zeros_like(visual)
    context[slot:slot + n_visual:per_frame] = True
    assert ablated[:, context].abs().max() == 0 and normal[:, context].abs().min() > 0
    assert torch.equal(ablated[:, ~context], normal[:, ~context])
    assert torch.equal(again, normal)  # the ablation ends with the block


def test_a_mixed_batch_gives_each_sample_its_own_tokens(fixtures):
    """A video, an image and a text-only prompt in one batch go through EVA and the Q-Former together; each
    sample's embeddings must be those it gets alone (which the cases above check against the original)."""
    meta, t = load_case(fixtures, "video_single")
    model = get_model(fixtures, meta["checkpoint"])
    image_meta, image_t = load_case(fixtures, "image_single")
    video = media_of(model, fixtures, meta, t)
    image = media_of(model, fixtures, image_meta, image_t)  # preprocessed at this model's size, as the video
    ids = t["input_ids"][0]
    text = ids[ids >= 0]
    samples = [(ids, video, meta["guided_prompts"][0]), (ids, image, "what is this?"), (text, None, None)]
    with torch.no_grad():
        alone = [model.embed([i], [m], [p])[0][0] for i, m, p in samples]
        together = model.embed([i for i, _, _ in samples], [m for _, m, _ in samples], [p for _, _, p in samples])[0]
    for b, want in enumerate(alone):
        assert_close(together[b, :len(want)], want, 1e-5)


class _RunsCode:
    """Pickles as a call of exec: loading a file holding it with plain pickle would run the code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _checkpoint_copy(fixtures, tmp_path, name="video"):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(fixtures / name, ckpt)
    return ckpt, dict(vision_path=fixtures / "eva_vit_g.pth", bert_path=fixtures / "bert-base-uncased")


@pytest.mark.parametrize("field, value", [("hidden_size", "abc"), ("num_hidden_layers", 2.5), ("vocab_size", None),
                                          ("mm_hidden_size", [176]), ("rope_scaling", {"type": "linear", "factor": "x"})])
def test_config_field_of_wrong_type_is_one_line(fixtures, tmp_path, field, value):
    ckpt, paths = _checkpoint_copy(fixtures, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        LlamaVID.from_pretrained(ckpt, **paths)
    msg = str(e.value)
    assert str(ckpt / "config.json") in msg and field in msg and "\n" not in msg


def test_shard_whose_pickle_would_run_code_is_refused(fixtures, tmp_path):
    ckpt, paths = _checkpoint_copy(fixtures, tmp_path)
    marker = tmp_path / "code-ran"
    shard = sorted(ckpt.glob("pytorch_model-*.bin"))[1]
    state = torch.load(shard, weights_only=True)
    state["model.extra"] = _RunsCode(marker)
    torch.save(state, shard)
    with pytest.raises(ValueError) as e:
        LlamaVID.from_pretrained(ckpt, **paths)
    msg = str(e.value)
    assert not marker.exists()
    assert str(shard) in msg and "\n" not in msg
    assert "not loaded" in msg and "truncated" not in msg.replace(str(shard), "")
