"""What every front end shares (sample.py, serve.py, eval.py, bench.py): loading a model for a device (dtype, Hub
ids, LoRA runs, quantisation), and a chat about one image, video or movie: where the media goes in the prompt, the
context check, text streamed with stop strings, and generation through LlamaVID.generate."""
import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from checkpoint import checkpoint_dir, is_hub_id
from data import Tokenizer, build_prompt, tokenize_with_images
from lora import load_lora_model, read_adapter_config
from model import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, LlamaVID, Media
from quantize import quantize_model

DEFAULT_MODEL = Path("out/shapes")  # the tiny model the quick start trains, used when no model is named
TEMPLATE = "vicuna_v1"              # the conversation template of every released chat model


# ----------------------------------------------------------------------------------------------------------
# loading

def pick_device(name="auto") -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r} is not a device: use cuda, cuda:1, mps or cpu") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this PyTorch sees no CUDA GPU; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name, device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def lora_base(lora_dir: Path) -> str:
    """The checkpoint a LoRA run names as its base (adapter_config.json's base_model_name_or_path), when that is a
    directory here or a Hub id; otherwise the user must say it."""
    named = read_adapter_config(lora_dir).get("base_model_name_or_path")
    if named and ((Path(named) / "config.json").is_file() or is_hub_id(named)):
        return named
    where = f" (its adapter_config.json names {named}, which is not a checkpoint directory here)" if named else ""
    raise ValueError(f"which checkpoint did the LoRA run {lora_dir} train on?{where} Pass --model-base DIR")


def load_model(model_path=None, lora=None, model_base=None, vision_path=None, bert_path=None, device="auto",
               dtype="auto", quantize=None, load_vision=True):
    """(model, tokenizer, name) for inference. model_path: a checkpoint directory or a Hub id (default: the quick
    start's out/shapes). A LoRA run is merged on load: lora=RUN with model_base=BASE (default: model_path, else
    the base its adapter_config.json names), or, as the original's scripts say it, model_path=RUN and
    model_base=BASE. On CUDA the q/k/v and gate/up projections are fused; quantize: "int8" or "int4"."""
    if lora is None and model_path is not None and (Path(model_path) / "adapter_config.json").is_file():
        lora, model_path = model_path, None
    if lora is not None:
        lora = checkpoint_dir(lora)
        model_path = model_base or model_path or lora_base(lora)
    elif model_path is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise ValueError("no --model-path given and no trained tiny model in out/shapes (train one: see the "
                             "README's quick start)")
        model_path = DEFAULT_MODEL
    name = str(model_path).rstrip("/").rsplit("/", 1)[-1]
    download = is_hub_id(model_path)  # a released model by Hub id: its EVA weights and BERT vocabulary come too
    path = checkpoint_dir(model_path)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    if lora is not None:
        model = load_lora_model(lora, path, vision_path=vision_path, bert_path=bert_path, dtype=dtype, device=device,
                                load_vision=load_vision, download=download)
        tokenizer = Tokenizer(lora if (lora / "tokenizer.model").is_file() else path)
    else:
        model = LlamaVID.from_pretrained(path, vision_path=vision_path, bert_path=bert_path, dtype=dtype,
                                         device=device, load_vision=load_vision, download=download)
        tokenizer = Tokenizer(path)
    if device.type == "cuda":
        model.llm.fuse()  # stacked q/k/v and gate/up projections: fewer, larger matmuls when decoding
    if quantize:
        quantize_model(model.llm, quantize, device=device)
    return model, tokenizer, name


def default_sampling(movie: bool):
    """(temperature, top_p) when the user gives none: the original's chat (0.2, 0.7) and movie (0.6, 0.9) scripts."""
    return (0.6, 0.9) if movie else (0.2, 0.7)


# ----------------------------------------------------------------------------------------------------------
# prompts

def human_message(question: str, media: Optional[Media]) -> str:
    """The human turn that carries the media: `<image>` (or a movie's frames-and-subtitles text) on a line of its
    own before the question, as the original's chat writes it."""
    if media is None:
        return question
    return (media.text if media.kind == "movie" else IMAGE_TOKEN) + "\n" + question


def prompt_text(messages, system=None) -> str:
    """A conversation [(role, text), ...] as the prompt string, ending with the assistant's turn to speak."""
    return build_prompt(list(messages) + [("ASSISTANT", None)], TEMPLATE, system=system)


def prompt_ids(tokenizer, messages, system=None) -> list:
    return tokenize_with_images(prompt_text(messages, system), tokenizer)


def prompt_length(model: LlamaVID, ids, kind: Optional[str] = None, frames: int = 0) -> int:
    """How many positions the LLM will see for ids with the media spliced in, from shapes alone, so that a prompt
    too long for the context fails before the vision tower spends minutes on an hour of frames."""
    slots = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
    if kind is None or kind == "movie" or slots == 0:  # a movie prompt holds one placeholder per visual token
        return len(ids)
    return len(ids) - slots + slots * frames * model.frame_tokens(kind)


# ----------------------------------------------------------------------------------------------------------
# streaming

class TextStream:
    """Generated tokens in, text out: whole UTF-8 characters only, and never a piece that could begin a stop string
    until it is known not to. Called with each step's tokens (generate's callback); returns True to stop generation:
    at EOS, at a stop string (the text ends before it), or when cancelled() says nobody is listening any more."""

    def __init__(self, tokenizer, on_text: Optional[Callable] = None, stop=(), cancelled: Optional[Callable] = None):
        self.tokenizer, self.on_text, self.stop, self.cancelled = tokenizer, on_text, [s for s in stop if s], cancelled
        self.ids, self.text, self.finish_reason, self.hit_stop = [], "", "length", False

    def __call__(self, tok) -> bool:
        if self.cancelled is not None and self.cancelled():
            self.finish_reason = "cancelled"
            return True
        t = int(tok[0])
        if t == self.tokenizer.eos_id:
            self.finish_reason = "stop"
            return True
        self.ids.append(t)
        text = self.tokenizer.decode(self.ids)
        return not text.endswith("\ufffd") and self._flush(text)  # (a partial UTF-8 character waits)

    def _flush(self, text, final=False) -> bool:
        hits = [i for i in (text.find(s, max(len(self.text) - len(s) + 1, 0)) for s in self.stop) if i >= 0]
        if hits:
            self._send(text[:max(min(hits), len(self.text))])
            self.finish_reason, self.hit_stop = "stop", True
            return True
        hold = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._send(text[:len(text) - hold])
        return False

    def _send(self, text):
        if len(text) > len(self.text):
            if self.on_text is not None:
                self.on_text(text[len(self.text):])
            self.text = text

    def finish(self) -> str:
        """Send what was held back (nothing after a stop string) and return the whole text."""
        if not self.hit_stop:  # (after EOS or the length limit, text held back for a stop string is sent)
            self._flush(self.tokenizer.decode(self.ids), final=True)
        return self.text

    @property
    def count(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------------------------
# a conversation

@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int


class Chat:
    """One conversation about one image, video or movie (or none). As the original's chat does, the media always
    goes with the latest question (earlier turns keep only their text), and that question guides its tokens. A
    video's frames go through EVA once, at the first question; later turns reuse the features."""

    def __init__(self, model: LlamaVID, tokenizer, media: Optional[Media] = None, messages=(), system=None,
                 compile=False):
        self.model, self.tokenizer, self.media, self.system, self.compile = model, tokenizer, media, system, compile
        self.messages = list(messages)  # earlier turns, (role, text)
        self.reply: Optional[Reply] = None  # the last answer's details

    @property
    def context(self) -> int:
        return self.model.llm.cfg.context_length

    def prompt_text(self, question) -> str:
        return prompt_text(self.messages + [("USER", human_message(question, self.media))], self.system)

    def prompt_ids(self, question) -> list:
        return tokenize_with_images(self.prompt_text(question), self.tokenizer)

    def prompt_length(self, ids, frames=None) -> int:
        """Positions the LLM will see for these ids; frames overrides the media's frame count (a check made before
        a video is decoded)."""
        if self.media is None:
            return len(ids)
        return prompt_length(self.model, ids, self.media.kind, self.media.frames if frames is None else frames)

    def check_context(self, n, frames=None):
        if n >= self.context:
            frames = self.media.frames if frames is None and self.media is not None else frames
            what = f" ({frames} frame{'s' if frames != 1 else ''})" if frames else ""
            fix = ("ask a shorter question, or start a new conversation" if self.messages else
                   "use fewer frames (--fps, --max-frames) or a shorter question")
            raise ValueError(f"the prompt is {n} tokens{what} but the model's context is {self.context} tokens: {fix}")

    @torch.no_grad()
    def ask(self, question, max_new_tokens=512, temperature=None, top_p=None, on_text=None, stop=(), generator=None,
            cancelled=None, debug=False) -> str:
        """The answer to the next question (streamed through on_text as it comes); self.reply holds its details.
        Without temperature / top_p, the original's defaults for this kind of media."""
        movie = self.media is not None and self.media.kind == "movie"
        t, p = default_sampling(movie)
        temperature, top_p = t if temperature is None else temperature, p if top_p is None else top_p
        ids = self.prompt_ids(question)
        n = self.prompt_length(ids)
        self.check_context(n)
        cut = n + max_new_tokens > self.context  # the answer may use what is left, no more
        max_new_tokens = min(max_new_tokens, self.context - n)
        if debug:
            print(f"[prompt, {n} tokens] {self.prompt_text(question)}", file=sys.stderr, flush=True)
        if self.media is not None and self.media.features is None:  # EVA once; every later turn reuses it
            self.media.features, self.media.pixels = self.model.encode(self.media.pixels), None
        device = self.model.llm.tok_embeddings.weight.device
        stream = TextStream(self.tokenizer, on_text, stop, cancelled)
        self.model.generate(torch.tensor(ids, device=device)[None], [self.media], [[question]],
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_id=None,
                            callback=stream, generator=generator, compile=self.compile)
        answer = stream.finish()
        if cut and stream.finish_reason == "length":
            print(f"\nnote: the answer stopped at the end of the model's context ({self.context} tokens)",
                  file=sys.stderr)
        self.reply = Reply(answer, stream.finish_reason, n, stream.count)
        self.messages += [("USER", question), ("ASSISTANT", answer.strip())]
        return answer.strip()


def check_sampling(temperature, top_p):
    """The one check of sampling settings a user gives (the command line's and the server's)."""
    if temperature is not None and not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ----------------------------------------------------------------------------------------------------------
# the command lines' conventions: a user's mistake is one line and exit code 2

class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported in one line (exit code 2) instead of the usage text."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_model_args(p):
    """The options every command that loads a model for inference takes."""
    p.add_argument("--model-path", default=None, help="LLaMA-VID checkpoint directory, or a Hugging Face Hub id "
                   "such as YanweiLi/llama-vid-7b-full-224-video-fps-1 (default: out/shapes)")
    p.add_argument("--vision-path", type=Path, default=None, help="eva_vit_g.pth, if the checkpoint lacks it")
    p.add_argument("--bert-path", type=Path, default=None, help="bert-base-uncased vocab.txt (or its folder)")
    p.add_argument("--lora", type=Path, default=None, help="a LoRA run directory (peft layout) to merge on load")
    p.add_argument("--model-base", default=None, help="the checkpoint a LoRA run trained on (default: "
                   "--model-path, else the base its adapter_config.json names)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (auto picks the first available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantisation of the LLM (the original's --load-8bit / --load-4bit)")


def add_media_args(p):
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    p.add_argument("--max-frames", type=int, default=None, help="cap on frames (evenly subsampled)")


def check_args(p, args):
    """The checks of the options the command lines share."""
    if hasattr(args, "fps") and not 0 < args.fps < math.inf:
        p.error(f"--fps must be a positive, finite number of frames per second, got {args.fps}")
    if getattr(args, "max_frames", None) is not None and args.max_frames < 1:
        p.error(f"--max-frames must be at least 1, got {args.max_frames}")
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        check_sampling(getattr(args, "temperature", None), getattr(args, "top_p", None))
    except ValueError as e:
        p.error("--" + str(e).replace("_", "-"))
    return args


def load_model_from_args(args, load_vision=True):
    return load_model(args.model_path, args.lora, args.model_base, args.vision_path, args.bert_path, args.device,
                      args.dtype, args.quantize, load_vision)


def run_command(main):
    """Run a command line's main: a user's mistake (a missing file, a broken video, a wrong checkpoint) ends in one
    "error:" line and exit code 2, warnings print as one line, Ctrl-C ends quietly."""
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"
    try:
        sys.exit(main())
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
