"""Data for LLaMA-VID: the LLaMA tokenizer, conversation templates, `<image>` splicing and label masking,
then media loading, LLaVA-format datasets, collation and the synthetic dataset."""

import hashlib
import json
import math
import random
import re
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, UnidentifiedImageError

# ----------------------------------------------------------------------------------------------------
# Text: tokenizer, prompts, labels

IGNORE_INDEX = -100        # label value the loss skips
IMAGE_TOKEN_INDEX = -200   # input id standing for the visual tokens of one image / one video
IMAGE_TOKEN = "<image>"    # its placeholder in prompt text
SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's word-start marker


class Tokenizer:
    """The LLaMA SentencePiece tokenizer, as transformers 4.31's LlamaTokenizer (slow) encodes and decodes.

    `path` is a tokenizer.model file or a checkpoint directory holding one. tokenizer_config.json beside it
    gives `legacy` and `clean_up_tokenization_spaces`; when absent we use Vicuna v1.5's values (both false),
    which every LLaMA-VID checkpoint carries.
    """

    def __init__(self, path):
        path = Path(path)
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise FileNotFoundError(
                f"LLaMA tokenizer not found: {model_file} does not exist. Pass the checkpoint directory that "
                f"holds tokenizer.model, or the path of a tokenizer.model file (Vicuna v1.5's)."
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        config_file = model_file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.legacy = bool(config.get("legacy", False))
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self.unk_id  # LLaVA / LLaMA-VID train with pad = unk
        self.vocab_size = self.sp.get_piece_size()
        # HF cuts the text at the special-token literals before SentencePiece sees it. They are AddedTokens
        # with lstrip/rstrip false in Vicuna's files, so no whitespace around them is removed.
        self.special = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id)}
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in self.special) + ")")

    def encode(self, text, bos=True):
        ids = [self.bos_id] if bos else []
        if not self.legacy:
            # 4.31 marks the true start of the text with "▁" (and turns any "▁" inside it into a space), so
            # that only the first segment keeps SentencePiece's dummy-prefix space.
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        for i, segment in enumerate(self._special_re.split(text)):
            if not segment:
                continue
            if segment in self.special:
                ids.append(self.special[segment])
                continue
            first = i == 0
            if not self.legacy and first:
                segment = segment[1:]
            pieces = self.sp.encode(segment, out_type=str)
            if not self.legacy and not first and not segment.startswith(" ") and pieces and \
                    pieces[0].startswith(SPIECE_UNDERLINE):
                # a segment glued to the special token before it has no space: drop the dummy "▁" from its
                # first piece; the rest is looked up as is and may not exist (then it is <unk>, id 0).
                pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
            ids.extend(self.sp.piece_to_id(p) for p in pieces)
        return ids

    def decode(self, ids):
        # skip_special_tokens=True drops bos, eos and unk; negative ids are image placeholders, not text
        skip = (self.bos_id, self.eos_id, self.unk_id)
        ids = [int(i) for i in ids if int(i) >= 0 and int(i) not in skip]
        text = self.sp.decode(ids)
        if self.clean_up_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text


def tokenize_with_images(text, tokenizer):
    """LLaVA's tokenizer_image_token: each `<image>`-separated chunk is encoded on its own (with its own
    dummy-prefix space), only the first BOS is kept, and chunks are joined by IMAGE_TOKEN_INDEX."""
    ids = [tokenizer.bos_id]
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk, bos=False))
    return ids


SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("vicuna_v1", "imgsp_v1", "plain_guided")
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


def build_prompt(messages, template):
    """messages: [("USER"|"ASSISTANT", text or None), ...]; a final ("ASSISTANT", None) leaves the open
    "ASSISTANT:" that generation continues from."""
    if template in ("vicuna_v1", "imgsp_v1"):
        # separators alternate by position: " " after a user turn, "</s>" after a reply
        prompt = SYSTEM_VICUNA + " "
        for i, (role, text) in enumerate(messages):
            prompt += f"{role}: {text}" + (" ", "</s>")[i % 2] if text else f"{role}:"
        return prompt
    if template == "plain_guided":
        # stage-1 alignment: the LLM sees only the image and the caption; the question goes to the Q-Former
        return "".join(IMAGE_TOKEN if role == "USER" else (text + "\n" if text else "") for role, text in messages)
    raise ValueError(f"unknown conversation template {template!r}: use one of {', '.join(TEMPLATES)}")


def image_first(source):
    """What LLaVA's preprocess_multimodal does to a sample before preprocess: in every message holding
    `<image>`, all of them are removed and one is put first, followed by a newline. Returns a new list."""
    out = []
    for sentence in source:
        value = sentence["value"]
        if IMAGE_TOKEN in value:
            value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
        out.append({**sentence, "value": value})
    return out


def source_to_messages(source, template, rng=None):
    """LLaVA-format conversation -> (messages for build_prompt, guided prompts for the Q-Former).

    imgsp_v1 repeats the image in every human turn after the one that shows it, before or after the text
    by rng.randint(0, 1) (the original draws from the global `random`, which rng defaults to)."""
    rng = random if rng is None else rng
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}: use one of {', '.join(TEMPLATES)}")
    if template == "plain_guided":
        if len(source) != 2 or IMAGE_TOKEN not in source[0]["value"]:
            raise ValueError("plain_guided samples are one human turn holding <image> and one gpt caption")
        guided = [source[0]["value"].replace(IMAGE_TOKEN, "").replace("\n", "")]
        return [("USER", IMAGE_TOKEN), ("ASSISTANT", source[1]["value"])], guided
    if source and source[0]["from"] != "human":
        source = source[1:]  # the original skips a leading gpt turn
    messages, guided, image_seen = [], [], False
    for j, sentence in enumerate(source):
        role = ROLES.get(sentence["from"])
        if role != ("USER", "ASSISTANT")[j % 2]:
            raise ValueError(f"conversation turn {j} is from {sentence['from']!r}: turns must alternate "
                             f"human, gpt, human, ...")
        value = sentence["value"]
        if role == "USER":
            guided.append(value.replace(IMAGE_TOKEN, "").replace("\n", ""))
        image_seen = image_seen or IMAGE_TOKEN in value  # set by a turn of either role
        if template == "imgsp_v1" and role == "USER" and image_seen and IMAGE_TOKEN not in value:
            value = IMAGE_TOKEN + "\n" + value if rng.randint(0, 1) == 0 else value + "\n" + IMAGE_TOKEN
        messages.append((role, value))
    return messages, guided


def preprocess(source, tokenizer, template, has_image=True, rng=None, max_len=2048):
    """One LLaVA-format sample -> (input_ids (L,), labels (L,), guided_prompts), as the original's
    preprocess_v1 / preprocess_imgsp_v1 / preprocess_plain_guided make them.

    Labels keep only the assistant replies and their "</s>". vicuna_v1's original returns no guided
    prompts; we give the same per-human-turn prompts as imgsp_v1 so the Q-Former has its questions."""
    messages, guided = source_to_messages(source, template, rng)
    conversation = build_prompt(messages, template)

    if template == "plain_guided":
        input_ids = tokenize_with_images(conversation, tokenizer)
        labels = list(input_ids)
        n_image = len(tokenize_with_images(IMAGE_TOKEN, tokenizer))  # bos + image
        labels[:n_image] = [IGNORE_INDEX] * min(n_image, len(labels))
        return torch.tensor(input_ids), torch.tensor(labels), guided

    def encode(text):
        # text-only samples go through tokenizer(...) with truncation; visual ones are never truncated here
        return tokenize_with_images(text, tokenizer) if has_image else tokenizer.encode(text)[:max_len]

    input_ids = encode(conversation)
    labels = list(input_ids)
    # The original re-tokenises each round ("... ASSISTANT: reply", split at "</s>") on its own and walks
    # the counts: a round costs len(its ids) (its bos stands for the "</s>" cut off), the instruction part
    # len(ids of "... ASSISTANT: ") - 2 (bos and the trailing "▁"). We keep that arithmetic, quirks included.
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX]
    for round_text in conversation.split("</s>"):
        if round_text == "":
            break
        parts = round_text.split(sep)
        if len(parts) != 2:
            break
        round_len = len(encode(round_text))
        instruction_len = len(encode(parts[0] + sep)) - 2
        end = min(cur + instruction_len, len(labels))
        labels[cur:end] = [IGNORE_INDEX] * max(0, end - cur)
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * max(0, len(labels) - cur)
    # The original counts the real tokens as those != pad (= unk, 0), so a sample holding an <unk> token
    # (or any count mismatch) is masked out entirely.
    total = sum(1 for i in input_ids if i != tokenizer.pad_id)
    if cur < max_len and cur != total:
        labels = [IGNORE_INDEX] * len(labels)
        warnings.warn(f"tokenization mismatch: {cur} vs. {total}; the sample's labels are all ignored")
    return torch.tensor(input_ids), torch.tensor(labels), guided
