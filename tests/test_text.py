"""Text side of data.py against the original's fixtures (tokenizer, <image> splicing, prompts, labels)
and against hand counts made from the conversation strings."""

import json
import random
import shutil

import pytest
import sentencepiece as spm

from conftest import case_names, load_case
from data import (IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, Tokenizer, build_prompt, image_first,
                  preprocess, source_to_messages, tokenize_with_images)


@pytest.fixture(scope="module")
def tok(fixtures):
    return Tokenizer(fixtures / "tokenizer.model")


@pytest.fixture(scope="module")
def text_cases(fixtures):
    return json.loads((fixtures / "cases" / "text.json").read_text())


def unmasked_spans(labels):
    """[(start, end)] of the runs of labels that are not IGNORE_INDEX."""
    spans, start = [], None
    for i, v in enumerate(list(labels) + [IGNORE_INDEX]):
        if v != IGNORE_INDEX and start is None:
            start = i
        elif v == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ---- tokenizer: the original's outputs ----

def test_constants():
    assert (IGNORE_INDEX, IMAGE_TOKEN_INDEX, IMAGE_TOKEN) == (-100, -200, "<image>")


def test_tokenizer_image_token_cases(tok, text_cases):
    cases = text_cases["llama_tokenizer_image_token"]
    assert cases
    for case in cases:
        assert tokenize_with_images(case["text"], tok) == case["input_ids"], case["text"]


def test_decode_cases(tok, text_cases):
    cases = text_cases["llama_decode"]
    assert cases
    for case in cases:
        assert tok.decode(case["ids"]) == case["text"], case["ids"]


def test_special_ids(tok, fixtures):
    sp = spm.SentencePieceProcessor(model_file=str(fixtures / "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.unk_id(),
                                                                    sp.get_piece_size())
    assert Tokenizer(fixtures / "image").encode("a</s>b") == tok.encode("a</s>b")  # directory form


def test_legacy_true_keeps_dummy_space(fixtures, tmp_path):
    # legacy=true: every segment between special tokens is plain SentencePiece, dummy "▁" included
    shutil.copy(fixtures / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    sp = spm.SentencePieceProcessor(model_file=str(fixtures / "tokenizer.model"))
    legacy = Tokenizer(tmp_path)
    assert legacy.legacy
    text_a, text_b = "USER: hi", "USER: again"
    assert legacy.encode(f"{text_a}</s>{text_b}") == [sp.bos_id()] + sp.encode(text_a) + [sp.eos_id()] + sp.encode(text_b)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)  # a directory without tokenizer.model
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer(missing)


# ---- every fixture prompt ----

def test_case_prompts_tokenize_like_the_original(tok, fixtures):
    checked = 0
    for name in case_names(fixtures):
        meta, tensors = load_case(fixtures, name)
        prompts = meta["prompts"] if "prompts" in meta else [meta["prompt"]] if "prompt" in meta else []
        for row, prompt in enumerate(prompts):
            ids = tensors["input_ids"][row]
            if "attention_mask" in tensors:
                ids = ids[tensors["attention_mask"][row].bool()]
            assert tokenize_with_images(prompt, tok) == ids.tolist(), (name, row)
            checked += 1
    assert checked > 0


# ---- training cases: prompt, ids, labels and guided prompts of the original preprocess ----

def training_cases(fixtures):
    out = []
    for name in case_names(fixtures):
        meta, tensors = load_case(fixtures, name)
        if "template" in meta:
            sources = meta["sources"] if "sources" in meta else [meta["source"]]
            prompts = meta["prompts"] if "prompts" in meta else [meta["prompt"]]
            out.append((name, meta, tensors, sources, prompts))
    return out


def test_training_cases(tok, fixtures):
    cases = training_cases(fixtures)
    assert cases
    for name, meta, tensors, sources, prompts in cases:
        # the original draws from the global `random`, seeded once, sample after sample
        seed = meta.get("python_random_seed", 0)
        rng_prompt, rng_pre = random.Random(seed), random.Random(seed)
        for row, source in enumerate(sources):
            messages, guided = source_to_messages(source, meta["template"], rng_prompt)
            assert build_prompt(messages, meta["template"]) == prompts[row], (name, row)
            assert guided == meta["guided_prompts"][row], (name, row)

            input_ids, labels, guided = preprocess(source, tok, meta["template"], has_image=True, rng=rng_pre)
            want_ids, want_labels = tensors["input_ids"][row], tensors["labels"][row]
            if "attention_mask" in tensors:  # right-padded batch: compare the real part, check the padding
                keep = tensors["attention_mask"][row].bool()
                assert (want_labels[~keep] == IGNORE_INDEX).all()
                want_ids, want_labels = want_ids[keep], want_labels[keep]
            assert input_ids.tolist() == want_ids.tolist(), (name, row)
            assert labels.tolist() == want_labels.tolist(), (name, row)
            assert guided == meta["guided_prompts"][row], (name, row)


# ---- label masking counted by hand ----

SOURCE = [
    {"from": "human", "value": "<image>\nWhat colour is the ball?"},
    {"from": "gpt", "value": "The ball is red."},
    {"from": "human", "value": "Is it big?"},
    {"from": "gpt", "value": "No, it is small and round."},
]


@pytest.mark.parametrize("template,has_image", [("vicuna_v1", True), ("imgsp_v1", True), ("vicuna_v1", False)])
def test_labels_keep_exactly_the_replies(tok, template, has_image):
    source = SOURCE if has_image else [{**s, "value": s["value"].replace("<image>\n", "")} for s in SOURCE]
    input_ids, labels, guided = preprocess(source, tok, template, has_image=has_image, rng=random.Random(0))
    assert guided == ["What colour is the ball?", "Is it big?"]
    messages, _ = source_to_messages(source, template, random.Random(0))
    prompt = build_prompt(messages, template)
    encode = (lambda t: tokenize_with_images(t, tok)) if has_image else tok.encode
    assert input_ids.tolist() == encode(prompt)

    replies = [s["value"] for s in source if s["from"] == "gpt"]
    spans = unmasked_spans(labels.tolist())
    assert len(spans) == len(replies)
    search_from = 0
    for (start, end), reply in zip(spans, replies):
        # the reply starts right after "...ASSISTANT:" (the prompt up to there tokenises to a prefix: SentencePiece
        # pieces never cross the space that follows), and it is the reply's own pieces plus "</s>"
        head = prompt[:prompt.index(" ASSISTANT: " + reply, search_from) + len(" ASSISTANT:")]
        search_from = len(head)
        assert start == len(encode(head))
        assert end - start == len(tok.encode(reply, bos=False)) + 1
        span = labels[start:end].tolist()
        assert span == input_ids[start:end].tolist()
        assert span[-1] == tok.eos_id
        assert tok.decode(span) == reply
    assert spans[-1][1] == len(labels)


def test_plain_guided_masks_bos_and_image(tok):
    source = [{"from": "human", "value": "Describe the picture.\n<image>"},
              {"from": "gpt", "value": "A red ball on grass."}]
    messages, guided = source_to_messages(source, "plain_guided")
    assert build_prompt(messages, "plain_guided") == "<image>A red ball on grass.\n"
    assert guided == ["Describe the picture."]
    input_ids, labels, _ = preprocess(source, tok, "plain_guided")
    assert input_ids[:2].tolist() == [tok.bos_id, IMAGE_TOKEN_INDEX]
    assert labels[:2].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert labels[2:].tolist() == input_ids[2:].tolist()
    assert tok.decode(labels[2:].tolist()) == "A red ball on grass.\n"


def test_unk_token_masks_the_whole_sample(tok):
    # the original counts real tokens as those != pad (= unk), so a literal <unk> breaks its count check
    source = [{"from": "human", "value": "Say <unk>"}, {"from": "gpt", "value": "Fine."}]
    with pytest.warns(UserWarning, match="mismatch"):
        _, labels, _ = preprocess(source, tok, "vicuna_v1", has_image=False)
    assert (labels == IGNORE_INDEX).all()


# ---- prompt building ----

class FixedRng:
    def __init__(self, value):
        self.value = value

    def randint(self, a, b):
        return self.value


def test_imgsp_repeats_the_image_in_later_turns():
    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    before, _ = source_to_messages(SOURCE, "imgsp_v1", FixedRng(0))
    after, _ = source_to_messages(SOURCE, "imgsp_v1", FixedRng(1))
    plain, _ = source_to_messages(SOURCE, "vicuna_v1", FixedRng(0))
    head = system + " USER: <image>\nWhat colour is the ball? ASSISTANT: The ball is red.</s>"
    tail = " ASSISTANT: No, it is small and round.</s>"
    assert build_prompt(before, "imgsp_v1") == head + "USER: <image>\nIs it big?" + tail
    assert build_prompt(after, "imgsp_v1") == head + "USER: Is it big?\n<image>" + tail
    assert build_prompt(plain, "vicuna_v1") == head + "USER: Is it big?" + tail
    assert build_prompt([("USER", "<image>\nHi"), ("ASSISTANT", None)], "vicuna_v1") == \
        system + " USER: <image>\nHi ASSISTANT:"


def test_prompt_errors():
    with pytest.raises(ValueError, match="template"):
        build_prompt([("USER", "hi")], "llama_2")
    with pytest.raises(ValueError, match="alternate"):
        source_to_messages([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "vicuna_v1")


def test_image_first():
    source = [{"from": "human", "value": "Describe the clip.\n<image>"}, {"from": "gpt", "value": "Noise."}]
    assert image_first(source) == [{"from": "human", "value": "<image>\nDescribe the clip."},
                                   {"from": "gpt", "value": "Noise."}]
    assert source[0]["value"] == "Describe the clip.\n<image>"  # the input is left alone
