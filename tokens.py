"""LLaMA-VID's token generator: the Q-Former with its WordPiece tokenizer, the context token, content pooling
and the projectors that turn one image or video frame into 1 + n LLM tokens (the original's token_generation)."""
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from checkpoint import check_state, read_tensors

# -----------------------------------------------------------------------------
# WordPiece tokenizer (bert-base-uncased rules, as transformers 4.31's slow BertTokenizer applies them)


def _is_whitespace(ch):
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch):
    if ch in "\t\n\r":  # BERT counts these as whitespace, not control
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch):
    cp = ord(ch)
    # all non-alphanumeric ASCII is punctuation for BERT ("$", "^", "`" are not Unicode P*)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
    """bert-base-uncased tokenizer for the Q-Former's question text, plus the "[DEC]" token LLaMA-VID adds.

    __call__(texts) -> (input_ids (B, L), attention_mask (B, L)): [CLS] ... [SEP], truncated from the LEFT
    to max_length tokens in all, padded on the right with [PAD] to the longest text of the batch."""

    SPECIAL = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")

    def __init__(self, vocab_path, max_length=256, max_chars_per_word=100):
        path = Path(vocab_path)
        if path.is_dir():
            path = path / "vocab.txt"
        if not path.is_file():
            raise FileNotFoundError(f"WordPiece vocabulary {path} not found: give bert-base-uncased's vocab.txt "
                                    "(or the folder holding it)")
        self.vocab = {}
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f.readlines()):
                # as HF's load_vocab: a duplicated token keeps its LAST line number, and an added token's
                # id is len(vocab) (the number of distinct tokens), which may equal a duplicate's line
                self.vocab[line.rstrip("\n")] = i
        for tok in self.SPECIAL:
            if tok not in self.vocab:
                raise ValueError(f"{path} is not a BERT WordPiece vocabulary: it has no {tok} token")
        self.dec_id = len(self.vocab)  # "[DEC]", added as bos_token by LLaMA-VID's init_bert
        self.added = {"[DEC]": self.dec_id}
        self.max_length = max_length
        self.max_chars_per_word = max_chars_per_word
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        # special-token literals in the text are kept whole (HF splits on them before anything else,
        # longest first, and strips the whitespace around them)
        specials = sorted(set(self.SPECIAL) | set(self.added), key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    def __len__(self):
        return len(self.vocab) + len(self.added)

    def _basic(self, text):
        """Clean, split CJK characters, lower-case, strip accents, split punctuation."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(" " if _is_whitespace(ch) else ch)
        words = []
        for word in "".join(chars).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
            piece = ""
            for ch in word:
                if _is_punctuation(ch):
                    if piece:
                        words.append(piece)
                    words.append(ch)
                    piece = ""
                else:
                    piece += ch
            if piece:
                words.append(piece)
        return words

    def _wordpiece(self, word):
        """Greedy longest-match-first split into vocabulary pieces; [UNK] if any part cannot be matched."""
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return [self.unk_id]
            ids.append(self.vocab[piece])
            start = end
        return ids

    def encode(self, text):
        """Token ids of one text, without [CLS]/[SEP] and without truncation."""
        ids = []
        parts = self._special_re.split(text)
        for i, part in enumerate(parts):
            if i % 2 == 1:  # a special-token literal
                ids.append(self.added.get(part, self.vocab.get(part)))
                continue
            for word in self._basic(part):
                ids.extend(self._wordpiece(word))
        return ids

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = self.encode(text)
            keep = self.max_length - 2
            if len(ids) > keep:
                ids = ids[len(ids) - keep:]  # truncation_side="left": the END of a long question is kept
            rows.append([self.cls_id] + ids + [self.sep_id])
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, :len(r)] = 1
        return input_ids, attention_mask


def bert_num_heads(bert_path, hidden_size):
    """Head count of the Q-Former. No LLaMA-VID checkpoint stores it: the original took it from
    bert-base-uncased's config.json (12). We read num_attention_heads from a config.json beside the
    vocabulary when there is one and it divides hidden_size; else BERT's head width of 64 (768 -> 12)."""
    path = Path(bert_path) if bert_path is not None else None
    if path is not None and path.is_file():
        path = path.parent
    if path is not None and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        heads = cfg.get("num_attention_heads") if cfg.get("model_type") == "bert" else None  # not the LLM's
        if isinstance(heads, int) and heads > 0 and hidden_size % heads == 0:
            return heads
    if hidden_size % 64 == 0:
        return hidden_size // 64
    raise ValueError(f"cannot tell the Q-Former's head count for width {hidden_size}: put bert-base-uncased's "
                     "config.json beside its vocab.txt or pass num_heads")


# -----------------------------------------------------------------------------
# configs


@dataclass
class QFormerConfig:
    vocab_size: int = 30523  # bert-base-uncased's 30522 + "[DEC]"
    max_position: int = 512
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2  # layers 0, 2, 4, .. cross-attend to the image
    vision_width: int = 1408  # width of the features the cross-attention reads (EVA-g)
    num_query: int = 32
    eps: float = 1e-12
    dropout: float = 0.1  # BERT's hidden and attention dropout; active in train() as in the original

    @classmethod
    def tiny(cls):
        return cls(vocab_size=232, max_position=320, hidden_size=64, num_layers=4, num_heads=4,
                   intermediate_size=128, vision_width=176, num_query=8)


@dataclass
class TokenConfig:
    llm_dim: int = 4096
    vision_width: int = 1408  # mm_hidden_size: width of the vision features
    compress_type: str | None = "mean"  # "mean" (video models), "grid:g", None (all patches: image models)
    bert_type: str = "qformer_pretrain"  # "pretrain" in it -> vlm_att_ln normalises the Q-Former's input
    select_feature: str = "patch"  # "patch": the cls token is dropped from the content/context values
    projector_type: str = "mlp2x_gelu"  # mm_projector: "linear" or "mlp{N}x_gelu"
    # frames per Q-Former call in long-video mode. Rows are independent, so this only trades memory for speed: the
    # original's 64 leaves an hour of frames (57 blocks of small kernels) launch-bound
    long_video_block: int = 512
    qformer: QFormerConfig = field(default_factory=QFormerConfig)

    @property
    def num_query(self):
        return self.qformer.num_query

    @classmethod
    def tiny(cls):
        return cls(llm_dim=64, vision_width=176, qformer=QFormerConfig.tiny())

    def __post_init__(self):
        ct = self.compress_type
        if ct is not None and ct != "mean" and not re.fullmatch(r"grid:\d+", ct):
            raise ValueError(f"compress_type {ct!r} is not one of 'mean', 'grid:<g>' or None")
        if ct is not None and ct.startswith("grid:") and int(ct[5:]) < 2:
            raise ValueError(f"compress_type {ct!r}: the grid size must be at least 2")
        if "qformer" not in self.bert_type:
            raise ValueError(f"bert_type {self.bert_type!r} is not supported: only the 'qformer*' types are")
        if self.projector_type != "linear" and not re.fullmatch(r"mlp\d+x_gelu", self.projector_type):
            raise ValueError(f"projector_type {self.projector_type!r} is not 'linear' or 'mlp<N>x_gelu'")

    @classmethod
    def from_llamavid(cls, state_dict, llm_config=None, num_heads=None):
        """Config of a LLaMA-VID checkpoint: every width from its tensors, the options from its config.json
        (a dict), the head count from num_heads (see bert_num_heads; default: width / 64)."""
        sd = _strip_llamavid(state_dict)
        llm_config = llm_config or {}

        def need(key):
            if key not in sd:
                raise ValueError(f"checkpoint has no 'model.{key}': not a LLaMA-VID checkpoint")
            return sd[key]

        query = need("vlm_att_query")  # (1, num_query, hidden)
        bert = "vlm_att_encoder.bert."
        layer_ids = sorted({int(m.group(1)) for k in sd
                            if (m := re.match(re.escape(bert) + r"encoder\.layer\.(\d+)\.", k))})
        cross = [i for i in layer_ids if f"{bert}encoder.layer.{i}.crossattention.self.key.weight" in sd]
        if not layer_ids or not cross or cross[0] != 0:
            raise ValueError("checkpoint's Q-Former has no layers with cross-attention from layer 0 "
                             f"(layers {layer_ids}, cross-attention in {cross})")
        freq = cross[1] - cross[0] if len(cross) > 1 else len(layer_ids)
        if cross != [i for i in layer_ids if i % freq == 0]:
            raise ValueError(f"checkpoint's Q-Former has cross-attention in layers {cross}: not every "
                             "n-th layer, which this Q-Former cannot express")
        hidden = query.shape[2]
        if num_heads is None:
            num_heads = bert_num_heads(None, hidden)
        qcfg = QFormerConfig(
            vocab_size=need(bert + "embeddings.word_embeddings.weight").shape[0],
            max_position=need(bert + "embeddings.position_embeddings.weight").shape[0],
            hidden_size=hidden, num_layers=len(layer_ids), num_heads=num_heads,
            intermediate_size=need(bert + "encoder.layer.0.intermediate.dense.weight").shape[0],
            cross_attention_freq=freq,
            vision_width=need(bert + "encoder.layer.0.crossattention.self.key.weight").shape[1],
            num_query=query.shape[1])
        n_proj = len({k.split(".")[1] for k in sd if k.startswith("mm_projector.") and k.endswith(".weight")})
        projector = "linear" if "mm_projector.weight" in sd else f"mlp{n_proj}x_gelu"
        bert_type = llm_config.get("bert_type") or ("qformer_pretrain" if "vlm_att_ln.weight" in sd else "qformer")
        return cls(llm_dim=need("vlm_att_val_projector.weight").shape[0],
                   vision_width=need("vlm_att_key_projector.weight").shape[0],
                   compress_type=llm_config.get("compress_type"),
                   bert_type=bert_type,
                   select_feature=llm_config.get("mm_vision_select_feature", "patch"),
                   projector_type=llm_config.get("mm_projector_type", projector),
                   qformer=qcfg)


# -----------------------------------------------------------------------------
# the Q-Former: BERT whose first num_query positions are learned queries that also cross-attend to the image


class Attention(nn.Module):
    def __init__(self, dim, kv_dim, n_heads, dropout):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, kv, mask=None):
        # x (B, S, C), kv (B, M, Ckv), mask (B, 1, 1, M) bool, True = attend
        B, S, C = x.shape
        q = self.q(x).view(B, S, self.n_heads, -1).transpose(1, 2)
        k = self.k(kv).view(B, kv.shape[1], self.n_heads, -1).transpose(1, 2)
        v = self.v(kv).view(B, kv.shape[1], self.n_heads, -1).transpose(1, 2)
        # the memory-efficient kernel: faster than cuDNN's and flash's at these short sequences (tens of queries,
        # 256 keys, thousands of frames a batch); the math kernel stays the fallback (CPU, odd shapes)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, S, C))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross: bool):
        super().__init__()
        C, H, eps = cfg.hidden_size, cfg.intermediate_size, cfg.eps
        self.drop = nn.Dropout(cfg.dropout)
        self.self_attn = Attention(C, C, cfg.num_heads, cfg.dropout)
        self.self_ln = nn.LayerNorm(C, eps=eps)
        self.cross_attn = Attention(C, cfg.vision_width, cfg.num_heads, cfg.dropout) if has_cross else None
        self.cross_ln = nn.LayerNorm(C, eps=eps) if has_cross else None
        # queries and text share attention weights but have separate feed-forward nets
        self.query_fc1, self.query_fc2, self.query_ln = nn.Linear(C, H), nn.Linear(H, C), nn.LayerNorm(C, eps=eps)
        self.text_fc1, self.text_fc2, self.text_ln = nn.Linear(C, H), nn.Linear(H, C), nn.LayerNorm(C, eps=eps)

    def forward(self, x, mask, image, n_query, text_out=True):
        # post-LN residual blocks, as BERT has them
        x = self.self_ln(x + self.drop(self.self_attn(x, x, mask)))
        # contiguous halves: a Linear over a strided slice runs as a batched matmul per row, several times slower
        q, t = x[:, :n_query].contiguous(), x[:, n_query:].contiguous()
        if self.cross_attn is not None:  # only the query positions look at the image
            q = self.cross_ln(q + self.drop(self.cross_attn(q, image)))
        q = self.query_ln(q + self.drop(self.query_fc2(F.gelu(self.query_fc1(q)))))
        if not text_out or t.shape[1] == 0:
            return q
        t = self.text_ln(t + self.drop(self.text_fc2(F.gelu(self.text_fc1(t)))))
        return torch.cat([q, t], dim=1)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.word_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i % cfg.cross_attention_freq == 0)
                                    for i in range(cfg.num_layers))

    def forward(self, queries, input_ids, text_mask, image):
        """queries (B, Q, C), input_ids/text_mask (B, L), image (B, M, vision_width) -> (B, Q, C):
        the last hidden state of the query positions."""
        L = input_ids.shape[1]
        if L > self.cfg.max_position:
            raise ValueError(f"question of {L} tokens is longer than the Q-Former's {self.cfg.max_position} positions")
        pos = torch.arange(L, device=input_ids.device)
        text = self.word_emb(input_ids) + self.pos_emb(pos)  # text positions count from 0; queries have none
        x = self.drop(self.emb_ln(torch.cat([queries, text], dim=1)))
        n_query = queries.shape[1]
        keep = torch.cat([torch.ones_like(text_mask[:, :1]).expand(-1, n_query), text_mask], dim=1)
        mask = keep.bool()[:, None, None, :]  # (B, 1, 1, Q + L): queries and real text tokens
        for i, layer in enumerate(self.layers):
            # the text stream after the last layer feeds nothing: skip its feed-forward there
            x = layer(x, mask, image, n_query, text_out=i < len(self.layers) - 1)
        return x[:, :n_query]


# LAVIS/LLaMA-VID Q-Former names (under "bert.") and ours; HF's InstructBlipQFormerModel differs from LAVIS
# only in "attention.attention" for "attention.self" and "embeddings.layernorm"
_EMB_NAMES = [("embeddings.word_embeddings", "word_emb"), ("embeddings.position_embeddings", "pos_emb"),
              ("embeddings.LayerNorm", "emb_ln")]
_LAYER_NAMES = [("attention.self.query", "self_attn.q"), ("attention.self.key", "self_attn.k"),
                ("attention.self.value", "self_attn.v"), ("attention.output.dense", "self_attn.o"),
                ("attention.output.LayerNorm", "self_ln"),
                ("crossattention.self.query", "cross_attn.q"), ("crossattention.self.key", "cross_attn.k"),
                ("crossattention.self.value", "cross_attn.v"), ("crossattention.output.dense", "cross_attn.o"),
                ("crossattention.output.LayerNorm", "cross_ln"),
                ("intermediate.dense", "text_fc1"), ("output.dense", "text_fc2"), ("output.LayerNorm", "text_ln"),
                ("intermediate_query.dense", "query_fc1"), ("output_query.dense", "query_fc2"),
                ("output_query.LayerNorm", "query_ln")]


def _qformer_key(key, to_ours=True):
    """LAVIS Q-Former key (after "bert.") -> our QFormer key, or back with to_ours=False; None if unknown."""
    src, dst = (0, 1) if to_ours else (1, 0)
    m = re.fullmatch(r"(.+)\.(weight|bias)", key)
    if m is None:
        return None
    name, kind = m.groups()
    for pair in _EMB_NAMES:
        if name == pair[src]:
            return f"{pair[dst]}.{kind}"
    layer = r"encoder\.layer\.(\d+)\.(.+)" if to_ours else r"layers\.(\d+)\.(.+)"
    m = re.fullmatch(layer, name)
    if m is None:
        return None
    for pair in _LAYER_NAMES:
        if m.group(2) == pair[src]:
            return f"layers.{m.group(1)}.{pair[dst]}.{kind}" if to_ours else \
                f"encoder.layer.{m.group(1)}.{pair[dst]}.{kind}"
    return None


def _strip_llamavid(state_dict):
    """The token generator's entries of a LLaMA-VID state dict, with "model." stripped; other keys dropped."""
    out = {}
    for k, v in state_dict.items():
        k2 = k[len("model."):] if k.startswith("model.") else k
        if k2.startswith("vlm_att_") or k2.startswith("mm_projector."):
            out[k2] = v
    if not out:
        first = next(iter(state_dict), None)
        raise ValueError(f"state dict has no model.vlm_att_* / model.mm_projector.* entries (first key {first!r}): "
                         "not a LLaMA-VID checkpoint")
    return out


# -----------------------------------------------------------------------------
# the token generator


def _projector(kind, in_dim, out_dim):
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", kind).group(1))
    layers = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class VisualTokenizer(nn.Module):
    """Vision features of one image or video -> per frame a context token (the Q-Former's question-guided
    queries attending over the patches) and content tokens (pooled patches), projected to the LLM width."""

    def __init__(self, cfg: TokenConfig):
        super().__init__()
        self.cfg = cfg
        q = cfg.qformer
        self.vlm_att_query = nn.Parameter(torch.randn(1, q.num_query, q.hidden_size) * 0.02)
        # the original builds and applies this LayerNorm (eps 1e-5, EVA's ln_vision) only for "pretrain" types
        self.vlm_att_ln = nn.LayerNorm(q.vision_width) if "pretrain" in cfg.bert_type else None
        if self.vlm_att_ln is None and q.vision_width != cfg.vision_width:
            raise ValueError(f"the Q-Former reads {q.vision_width}-wide features but the vision features are "
                             f"{cfg.vision_width} wide")
        self.qformer = QFormer(q)
        self.vlm_att_projector = nn.Linear(q.hidden_size, cfg.vision_width)
        self.vlm_att_key_projector = nn.Linear(cfg.vision_width, cfg.vision_width)
        self.vlm_att_val_projector = nn.Linear(cfg.vision_width, cfg.llm_dim)
        self.mm_projector = _projector(cfg.projector_type, cfg.vision_width, cfg.llm_dim)
        self.wordpiece = None  # set by set_wordpiece / from_llamavid(bert_path=...)
        self.zero_context = False  # True: every context token is zero (eval.py --zero-context's ablation)

    def set_wordpiece(self, wordpiece):
        self.wordpiece = wordpiece if isinstance(wordpiece, WordPiece) else WordPiece(wordpiece)
        return self

    def tokens_per_frame(self, n_patches: int) -> int:
        """Tokens one frame of n_patches patches (cls excluded) becomes: a context token + the content tokens."""
        ct = self.cfg.compress_type
        if ct is None:
            return 1 + n_patches
        if ct == "mean":
            return 2
        side = math.isqrt(n_patches)
        return 1 + (side // (side // int(ct[5:]))) ** 2

    def _tokens(self, features, input_ids, text_mask, has_cls=True):
        """One batch of B (frame, prompt) rows: features (B, M, W), ids/mask (B, L) -> (B, 1 + n, llm_dim)."""
        cfg = self.cfg
        image = self.vlm_att_ln(features) if self.vlm_att_ln is not None else features
        queries = self.vlm_att_query.expand(features.shape[0], -1, -1)
        text_q = self.vlm_att_projector(self.qformer(queries, input_ids, text_mask, image))  # (B, Q, W)
        # the Q-Former above saw every token given (cls included for images and short videos); the context and
        # content tokens are made from the patches. (The original tells cls by an odd token count: the same
        # thing at every image size the released models use, 256 or 576 patches.)
        vis = features
        if cfg.select_feature == "patch" and has_cls:
            vis = vis[:, 1:]  # (B, N, W)
        keys = self.vlm_att_key_projector(vis)
        scores = text_q @ keys.transpose(-1, -2) / math.sqrt(vis.shape[-1])
        ctx = (scores.softmax(-1) @ vis).mean(1)  # values are the raw patches; mean over the queries
        ctx = self.vlm_att_val_projector(ctx[:, None])  # (B, 1, llm_dim)
        if self.zero_context:
            ctx = torch.zeros_like(ctx)
        ct = cfg.compress_type
        if ct == "mean":
            vis = vis.mean(dim=1, keepdim=True)
        elif ct is not None:  # "grid:g": average pool the patch grid with stride side // g
            side, grid = int(vis.shape[1] ** 0.5), int(ct[5:])
            if side * side != vis.shape[1]:
                raise ValueError(f"compress_type {ct!r} needs a square patch grid, got {vis.shape[1]} patches")
            stride = side // grid  # side not divisible by g: the pool keeps floor(side / stride) cells a side
            grid_in = vis.reshape(vis.shape[0], side, side, -1).permute(0, 3, 1, 2)
            vis = F.avg_pool2d(grid_in, kernel_size=stride, stride=stride).flatten(2).transpose(1, 2)
        return torch.cat([ctx, self.mm_projector(vis)], dim=1)

    def forward(self, features, prompts, long_video=False):
        """features (T, M, W): ONE image (T = 1) or video (T frames), M = 1 + N with cls first; or a long video's
        patches, M = N (long_video: cls removed by the caller, the Q-Former run in blocks of frames).
        prompts: this sample's guided prompts, one per human turn.
        Returns (len(prompts), T * (1 + n), llm_dim): for each prompt, frame by frame, [context, content..]."""
        return self.forward_many([features], [prompts], long_video)[0]

    def forward_many(self, features, prompts, long_video=False):
        """forward for several samples in one Q-Former batch (a training batch's images / videos): features[s]
        (T_s, M, W), prompts[s] its prompts. Rows are independent, so this gives what one call a sample gives."""
        if self.wordpiece is None:
            raise ValueError("VisualTokenizer has no WordPiece vocabulary: call set_wordpiece(path to vocab.txt)")
        prompts = [[p] if isinstance(p, str) else list(p) for p in prompts]
        if any(not p for p in prompts):
            raise ValueError("no guided prompts: give at least one (the question of each human turn)")
        for f in features:
            if f.dim() != 3 or f.shape[-1] != self.cfg.vision_width:
                raise ValueError(f"features must be (T, tokens, {self.cfg.vision_width}), got {tuple(f.shape)}")
        if len({f.shape[1] for f in features}) > 1:  # other patch counts: one batch for each
            return [self.forward_many([f], [p], long_video)[0] for f, p in zip(features, prompts)]
        param = self.vlm_att_key_projector.weight
        input_ids, text_mask = self.wordpiece([q for p in prompts for q in p])
        input_ids, text_mask = input_ids.to(param.device), text_mask.to(param.device)
        # rows are (prompt, frame) pairs, prompt-major within a sample as in the original. Short inputs go in one
        # batch; long videos in blocks of long_video_block rows, so only that many frames' Q-Former activations
        # (and casts to the model's dtype/device from an fp16 CPU cache) exist at a time.
        frame_idx, prompt_idx, f0, p0 = [], [], 0, 0
        for f, p in zip(features, prompts):
            T, P = f.shape[0], len(p)
            frame_idx.append(f0 + torch.arange(T).repeat(P))
            prompt_idx.append(p0 + torch.arange(P).repeat_interleave(T))
            f0, p0 = f0 + T, p0 + P
        frame_idx, prompt_idx = torch.cat(frame_idx), torch.cat(prompt_idx)
        all_features = features[0] if len(features) == 1 else torch.cat(features)
        block = self.cfg.long_video_block if long_video else len(frame_idx)
        out = []
        for start in range(0, len(frame_idx), block):
            fi, pid = frame_idx[start:start + block], prompt_idx[start:start + block].to(param.device)
            feats = all_features[fi.to(all_features.device)].to(device=param.device, dtype=param.dtype)
            out.append(self._tokens(feats, input_ids[pid], text_mask[pid], has_cls=not long_video))
        tokens = torch.cat(out)  # (sum of P_s * T_s, 1 + n, llm_dim)
        sizes = [len(p) * f.shape[0] for f, p in zip(features, prompts)]
        return [t.reshape(len(p), -1, t.shape[-1]) for t, p in zip(tokens.split(sizes), prompts)]

    # -------------------------------------------------------------------------
    # loading

    def load_state_dict_from_llamavid(self, state_dict):
        """Load model.vlm_att_* and model.mm_projector.* from a LLaMA-VID state dict (other keys are
        ignored). A key we cannot place, a missing key or a wrong shape raises ValueError naming it."""
        new = {}
        for k, v in _strip_llamavid(state_dict).items():
            if k == "vlm_att_encoder.bert.embeddings.position_ids":
                continue  # a stored arange, rebuilt on the fly
            if k.startswith("vlm_att_encoder.bert."):
                ours = _qformer_key(k[len("vlm_att_encoder.bert."):])
                new["qformer." + ours if ours else "unplaced." + k] = v
            else:
                new[k] = v
        self._load_checked(f"the token generator's weights (bert_type {self.cfg.bert_type!r}; build it with "
                           "TokenConfig.from_llamavid(state_dict))", new, self.state_dict(),
                           lambda k: "model." + (k[len("unplaced."):] if k.startswith("unplaced.") else
                                                 "vlm_att_encoder.bert." + _qformer_key(k[8:], to_ours=False)
                                                 if k.startswith("qformer.") else k))

    def set_dropout(self, p: float):
        """The Q-Former's dropout probability (hidden states and attention)."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, Attention):
                m.dropout = p
        return self

    def llamavid_state_dict(self, state=None):
        """Our weights (or `state`, a state dict of this module) under the original's key names
        (model.vlm_att_*, model.mm_projector.*), for saving."""
        out = {}
        for k, v in (self.state_dict() if state is None else state).items():
            if k.startswith("qformer."):
                out["model.vlm_att_encoder.bert." + _qformer_key(k[len("qformer."):], to_ours=False)] = v
            else:
                out["model." + k] = v
        return out

    def _load_checked(self, what, new, own, name):
        """Copy new (our names) into own after checking both hold the same keys and shapes (name: a key as the
        checkpoint calls it, for the report)."""
        check_state(what, new, own, name)
        with torch.no_grad():
            for k, v in new.items():
                own[k].copy_(v)

    @classmethod
    def from_llamavid(cls, state_dict, llm_config=None, bert_path=None, num_heads=None):
        """Token generator of a LLaMA-VID checkpoint (its state dict and config.json dict). bert_path: the
        WordPiece vocab.txt or its folder; a config.json beside it gives the head count (bert_num_heads)."""
        if num_heads is None:
            hidden = _strip_llamavid(state_dict).get("vlm_att_query")
            num_heads = bert_num_heads(bert_path, hidden.shape[2]) if hidden is not None else None
        cfg = TokenConfig.from_llamavid(state_dict, llm_config, num_heads)
        model = cls(cfg)
        model.load_state_dict_from_llamavid(state_dict)
        if bert_path is not None:
            model.set_wordpiece(bert_path)
        return model

    def load_instructblip(self, path_or_state_dict):
        """Stage-1 init from InstructBLIP (instruct_blip_vicuna*_trimmed.pth, {'model': {...}}):
        Qformer.bert.* -> Q-Former, ln_vision -> vlm_att_ln, query_tokens -> vlm_att_query. The projectors
        keep their fresh init; InstructBLIP's other parts (llm_proj, ...) are not ours and are skipped."""
        sd = path_or_state_dict
        if not isinstance(sd, dict):
            path = Path(sd)
            if not path.is_file():
                raise FileNotFoundError(f"InstructBLIP checkpoint {path} not found (instruct_blip_vicuna7b_trimmed.pth "
                                        "from LAVIS)")
            sd = read_tensors(path)
        sd = sd.get("model", sd)
        if self.vlm_att_ln is None:
            raise ValueError(f"bert_type {self.cfg.bert_type!r} has no vlm_att_ln: InstructBLIP init needs a "
                             "'qformer_pretrain*' type")
        new = {}
        for k, v in sd.items():
            if k.startswith("Qformer.cls.") or k == "Qformer.bert.embeddings.position_ids":
                continue  # the LM head is dropped (mm_model.cls = None); position ids are an arange
            if k.startswith("Qformer."):
                ours = _qformer_key(k[len("Qformer.bert."):]) if k.startswith("Qformer.bert.") else None
                new["qformer." + ours if ours else "unplaced." + k] = v
            elif k.startswith("ln_vision."):
                new["vlm_att_ln." + k[len("ln_vision."):]] = v
            elif k == "query_tokens":
                new["vlm_att_query"] = v
        if not new:
            first = next(iter(sd), None)
            raise ValueError(f"no Qformer.bert.* / ln_vision / query_tokens entries (first key {first!r}): "
                             "not an InstructBLIP checkpoint")
        trainable = ("vlm_att_projector.", "vlm_att_key_projector.", "vlm_att_val_projector.", "mm_projector.")
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(trainable)}
        self._load_checked("the InstructBLIP checkpoint (its QFormerConfig must match)", new, own,
                           lambda k: k[len("unplaced."):] if k.startswith("unplaced.") else
                           "Qformer.bert." + _qformer_key(k[8:], to_ours=False) if k.startswith("qformer.")
                           else {"vlm_att_query": "query_tokens"}.get(k, k.replace("vlm_att_ln.", "ln_vision.")))
        return self

    @classmethod
    def from_instructblip(cls, path_or_state_dict, cfg: TokenConfig | None = None):
        """A fresh token generator (cfg, default the real one) with its Q-Former part from InstructBLIP."""
        return cls(cfg or TokenConfig()).load_instructblip(path_or_state_dict)
