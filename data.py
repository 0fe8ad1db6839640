"""Data for LLaMA-VID: the LLaMA tokenizer, conversation templates, `<image>` splicing and label masking, the
LLaVA-format datasets the original trains on, collation, and the synthetic dataset."""

import json
import random
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from media import (LONG_VIDEO_SUFFIXES, image_media, load_video, preprocess_frames, read_feature_cache,
                   resize_frames)
from model import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, Media

# ----------------------------------------------------------------------------------------------------
# Text: tokenizer, prompts, labels

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


def build_prompt(messages, template, system=None):
    """messages: [("USER"|"ASSISTANT", text or None), ...]; a final ("ASSISTANT", None) leaves the open
    "ASSISTANT:" that generation continues from. system replaces Vicuna's system sentence."""
    if template in ("vicuna_v1", "imgsp_v1"):
        # separators alternate by position: " " after a user turn, "</s>" after a reply
        prompt = (SYSTEM_VICUNA if system is None else system) + " "
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


# ==========================================================================================================
# datasets: the LLaVA-format JSON the original trains on, collation, length grouping



class LLaVADataset(torch.utils.data.Dataset):
    """Samples of a LLaVA-format JSON list: {"image": file} or {"video": file} (a video, or a feature cache of
    a long video: our .safetensors or a .pkl imported by import_feature_pkl) or text only, with
    "conversations". An unreadable sample is skipped with a warning that names the file (it returns None)."""

    def __init__(self, json_path, tokenizer, template, image_folder="", video_folder="", image_size=224,
                 pad_to_square=True, video_fps=1.0, max_frames=None, video_token=2, max_len=2048, seed=0,
                 cache_videos=False):
        path = Path(json_path)
        if not path.is_file():
            raise FileNotFoundError(f"training data {path} does not exist")
        try:
            self.samples = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(self.samples, list):
            raise ValueError(f"{path} must hold a JSON list of samples in the LLaVA format")
        self.tokenizer, self.template = tokenizer, template
        self.image_folder, self.video_folder = Path(image_folder), Path(video_folder)
        self.image_size, self.pad_to_square = image_size, pad_to_square
        self.video_fps, self.max_frames, self.video_token = video_fps, max_frames, video_token
        self.max_len, self.seed = max_len, seed
        # cache_videos: keep each video's decoded frames (uint8, resized to image_size) in memory after its first
        # read, so later epochs skip decoding and resizing (fill_cache reads them all at once, encode_cache swaps
        # them for a frozen tower's features): for small clip sets like the shapes quick start's, not real data
        self.video_cache = {} if cache_videos else None

    def __len__(self):
        return len(self.samples)

    def fill_cache(self, workers=2):
        """Decode every video of the set into the cache now, `workers` files at a time, instead of one by one
        during the first epoch, where each decode would wait on the training threads. A file that fails is left out;
        its samples warn when drawn."""
        if self.video_cache is None:
            return 0
        files = {self.video_folder / s["video"] for s in self.samples if "video" in s} - set(self.video_cache)
        files = sorted(f for f in files if f.suffix not in LONG_VIDEO_SUFFIXES)

        def read(file):
            try:
                self._cached_video(file)
            except (OSError, ValueError):
                pass
        with ThreadPoolExecutor(workers) as pool:  # PyAV decodes without the GIL
            list(pool.map(read, files))
        return len(files)

    @torch.no_grad()
    def encode_cache(self, encode, videos_per_call=64):
        """Replace the cached frames by their features, encode(pixels (N, 3, S, S)) -> (N, 1+P, W), for a vision
        tower that never trains: the same clip then always gives the same features, and a training step skips the
        tower. Samples then carry features as media, which LlamaVID takes in place of pixels. Returns the number of
        videos encoded."""
        if self.video_cache is None:
            return 0
        # in a fixed order: fill_cache fills the cache in whatever order its threads finish, and a batch of other
        # clips gives other float roundings
        files = sorted(f for f, v in self.video_cache.items() if isinstance(v, np.ndarray))
        for i in range(0, len(files), videos_per_call):
            chunk = files[i:i + videos_per_call]
            pixels = torch.cat([preprocess_frames(self.video_cache[f], self.image_size) for f in chunk])
            for f, x in zip(chunk, encode(pixels).split([len(self.video_cache[f]) for f in chunk])):
                self.video_cache[f] = x.float().cpu()
        return len(files)

    def _cached_video(self, file):
        """A video's sampled frames, resized to image_size, decoded on first use and kept (or, after encode_cache,
        their features)."""
        if file not in self.video_cache:
            frames, _ = load_video(file, fps=self.video_fps, max_frames=self.max_frames)
            self.video_cache[file] = resize_frames(frames, self.image_size)
        return self.video_cache[file]

    def modality_lengths(self):
        """Word counts, negative for text-only samples (the original's group_by_modality_length input)."""
        out = []
        for s in self.samples:
            n = sum(len(c["value"].split()) for c in s["conversations"])
            out.append(n if ("image" in s or "video" in s) else -n)
        return out

    def load_media(self, sample):
        """(model.Media or None, conversation) for one sample; a long video rewrites the conversation."""
        conv = [dict(c) for c in sample["conversations"]]
        if "image" in sample:
            return image_media(self.image_folder / sample["image"], self.image_size, self.pad_to_square), conv
        if "video" not in sample:
            return None, conv
        file = self.video_folder / sample["video"]
        if file.suffix in LONG_VIDEO_SUFFIXES:  # a long video: cached features + its frame/subtitle text
            movie = read_feature_cache(file)
            text = (movie.text or "").replace(IMAGE_TOKEN, IMAGE_TOKEN * self.video_token)
            for c in conv:
                c["value"] = c["value"].replace(IMAGE_TOKEN, text)
            return movie, conv
        if self.video_cache is None:
            frames, _ = load_video(file, fps=self.video_fps, max_frames=self.max_frames)
        else:
            frames = self._cached_video(file)
            if isinstance(frames, torch.Tensor):  # EVA's features (encode_cache)
                return Media("video", features=frames), conv
        return Media("video", pixels=preprocess_frames(frames, self.image_size)), conv

    def __getitem__(self, i):
        sample = self.samples[i]
        try:
            media, conv = self.load_media(sample)
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"skipping sample {i} ({sample.get('image') or sample.get('video')}): {e}")
            return None
        rng = random.Random(self.seed * 1_000_003 + i)  # the same sample makes the same prompt on every run
        if media is not None and self.template != "plain_guided":
            conv = image_first(conv)
        long_video = media is not None and media.kind == "movie"
        try:
            ids, labels, prompts = preprocess(conv, self.tokenizer, self.template, has_image=media is not None,
                                              rng=rng, max_len=self.max_len)
        except ValueError as e:
            warnings.warn(f"skipping sample {i} (id {sample.get('id')}): {e}")
            return None
        if long_video:  # the movie text replaced the placeholder; the guided prompt is the question
            prompts = [sample["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()]
        return {"input_ids": ids[:self.max_len], "labels": labels[:self.max_len], "media": media,
                "prompts": prompts}


def collate(samples, pad_id=0):
    """Right-pad a list of dataset items into a batch; None items (skipped samples) are dropped."""
    n_given = len(samples)
    samples = [s for s in samples if s is not None]
    if not samples:
        return {"skipped": n_given}
    L = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), L), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "media": [s["media"] for s in samples], "prompts": [s["prompts"] for s in samples],
            "skipped": n_given - len(samples)}


def length_grouped_order(lengths, group_size, seed):
    """The original's group_by_modality_length order: multimodal and text-only samples never share a batch
    group; each group of `group_size` (world size x micro batch) holds samples of similar length, longest
    group first, the other groups shuffled. Deterministic given the seed."""
    g = torch.Generator().manual_seed(seed)

    def groups(indices):
        if not indices:
            return []
        perm = [indices[j] for j in torch.randperm(len(indices), generator=g).tolist()]
        megas = [perm[k:k + group_size * 50] for k in range(0, len(perm), group_size * 50)]
        out = []
        for mega in megas:  # sort each megabatch by length, then cut it into groups
            mega = sorted(mega, key=lambda j: -abs(lengths[j]))
            out += [mega[k:k + group_size] for k in range(0, len(mega), group_size)]
        return out
    mm = groups([i for i, n in enumerate(lengths) if n > 0])
    text = groups([i for i, n in enumerate(lengths) if n <= 0])
    full = [x for x in mm + text if len(x) == group_size]
    partial = [i for x in mm + text if len(x) < group_size for i in x]
    order = [full[j] for j in torch.randperm(len(full), generator=g).tolist()]
    if order:  # the longest group first, so an out-of-memory shows at step one
        longest = max(range(len(order)), key=lambda j: max(abs(lengths[i]) for i in order[j]))
        order.insert(0, order.pop(longest))
    return [i for x in order for i in x] + partial
