"""Chat with LLaMA-VID about an image, a short video or an hour-long movie from the command line.

python sample.py --model-path DIR (--image F | --video F | --features F) [--question "..."] [--subtitles F.srt]
"""
import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL = Path("out/shapes")  # the tiny model config/shapes.py trains, used when no --model-path is given


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported in one line (exit code 2) instead of the usage text."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None,
                   help="LLaMA-VID checkpoint directory, or a Hugging Face Hub id such as YanweiLi/llama-vid-7b-full-224-video-fps-1")
    p.add_argument("--vision-path", type=Path, default=None, help="eva_vit_g.pth, if the checkpoint lacks it")
    p.add_argument("--bert-path", type=Path, default=None, help="bert-base-uncased vocab.txt (or its folder)")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", type=Path)
    media.add_argument("--video", type=Path)
    media.add_argument("--features", type=Path, help="an EVA feature cache written by an earlier --video run")
    p.add_argument("--question", default=None, help="ask once and exit; without it, an interactive chat")
    p.add_argument("--subtitles", type=Path, default=None, help=".srt subtitles of the movie")
    p.add_argument("--movie", action="store_true", help="use the long-video prompt even for a short-video model")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    p.add_argument("--max-frames", type=int, default=None, help="cap on frames (evenly subsampled)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.2; 0.6 for movies)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass (default 0.7; 0.9 for movies)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (auto picks the first available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where movie feature caches go (default: beside the video)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="print each full prompt to stderr before its answer")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantisation of the LLM (the original's --load-8bit / --load-4bit)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs) and the prefill")
    p.add_argument("--lora", type=Path, default=None, help="a LoRA run directory (peft layout) to merge on load")
    p.add_argument("--model-base", type=Path, default=None,
                   help="the checkpoint a LoRA run trained on (default: --model-path)")
    args = p.parse_args(argv)
    check_common_args(p, args)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature is not None and not 0 <= args.temperature < math.inf:
        p.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    return args


def check_common_args(p, args):
    """The checks of the options sample.py and serve.py share."""
    if not 0 < args.fps < math.inf:
        p.error(f"--fps must be a positive, finite number of frames per second, got {args.fps}")
    if args.max_frames is not None and args.max_frames < 1:
        p.error(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def pick_device(name):
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


def pick_dtype(name, device):
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


@torch.no_grad()
def extract_features(model, frames, batch_size=32, workers=8, keep_on_device=False, stats=None):
    """EVA features (T, 1+N, W) and times of a stream of (frame, seconds), batch by batch, with a progress bar:
    an hour of 720p video never sits decoded in memory at once.

    The three stages overlap: a thread pulls frames from the iterator (the video decoder), a pool of `workers`
    threads preprocesses batches (PIL and PyAV do their work without the GIL), and this thread feeds the batches to
    EVA in order. Features go to the CPU in float16 (to cache them), or stay on the device with keep_on_device.
    stats, a dict, receives decode_s: the seconds spent inside the frame iterator (decoding)."""
    import queue
    import threading
    import time
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    from vision import preprocess_frames
    dev, dtype = model.llm.tok_embeddings.weight.device, model.llm.tok_embeddings.weight.dtype
    batches = queue.Queue(maxsize=2 * workers)  # bounded: decoding runs at most this far ahead of EVA
    stop = threading.Event()  # set when this thread leaves early (an error): the decoding thread then ends too
    decode_s = 0.0

    def put(x):
        while not stop.is_set():
            try:
                return batches.put(x, timeout=0.1)
            except queue.Full:
                pass

    def decode():
        nonlocal decode_s
        batch, stamps = [], []
        try:
            it = iter(frames)
            while True:
                t0 = time.perf_counter()
                item = next(it, None)
                decode_s += time.perf_counter() - t0
                if item is None:
                    break
                batch.append(item[0])
                stamps.append(item[1])
                if len(batch) == batch_size:
                    put((batch, stamps))
                    batch, stamps = [], []
                if stop.is_set():
                    return
            if batch:
                put((batch, stamps))
            put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which raises it
            put(e)

    out, times, pending = [], [], deque()
    bar = tqdm(desc="encoding frames", unit="frame", file=sys.stderr)

    def encode(job):
        pixels, n = job[0].result(), job[1]
        feats = model.vision(pixels.to(dev, dtype))
        out.append(feats if keep_on_device else feats.to("cpu", torch.float16))
        bar.update(n)

    producer = threading.Thread(target=decode, daemon=True)
    try:
        with ThreadPoolExecutor(workers) as pool:
            producer.start()
            while (item := batches.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                times += item[1]
                pending.append((pool.submit(lambda b: preprocess_frames(np.stack(b), model.image_size), item[0]),
                                len(item[0])))
                if len(pending) > workers:
                    encode(pending.popleft())
            while pending:
                encode(pending.popleft())
    finally:
        stop.set()
        bar.close()
    if stats is not None:
        stats["decode_s"] = decode_s
    if not out:
        raise ValueError("the video gave no frames to encode")
    return torch.cat(out), times


def feature_cache_path(video: Path, cache_dir, digest: str) -> Path:
    folder = Path(cache_dir) if cache_dir else video.parent
    return folder / f"{video.stem}.{digest[:16]}.features.safetensors"


def movie_features(model, video: Path, args):
    """(features (T, 1+N, W), frame times) of a long video, computed once and cached by content hash."""
    from safetensors.torch import save_file
    from data import content_hash, iter_video
    cache = feature_cache_path(video, args.cache_dir, content_hash(video))
    if cache.exists():
        print(f"using cached features {cache}", file=sys.stderr)
        return read_feature_cache(cache)
    features, times = extract_features(model, iter_video(video, fps=args.fps, max_frames=args.max_frames))
    tmp = cache.with_suffix(".tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": features.contiguous(), "times": torch.tensor(times, dtype=torch.float64)}, str(tmp),
                  metadata={"video": str(video), "fps": str(args.fps)})
        tmp.replace(cache)
        print(f"features cached in {cache}", file=sys.stderr)
    except OSError as e:  # a read-only folder costs the cache, not the answer
        print(f"warning: could not write the feature cache {cache} ({e}); pass --cache-dir to keep it",
              file=sys.stderr)
    return features, times


def read_feature_cache(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise FileNotFoundError(f"feature cache {path} does not exist")
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a feature cache written by sample.py ({e})") from None
    if "features" not in d or "times" not in d or d["features"].ndim != 3:
        raise ValueError(f"{path} is not a feature cache written by sample.py (needs 'features' (T, 1+N, W) and "
                         "'times')")
    return d["features"], d["times"].tolist()


def prompt_length(model, ids, media) -> int:
    """How many tokens the LLM will see for ids with the media spliced in, from shapes alone, so that a prompt
    too long for the context fails before the vision tower spends minutes on an hour of frames."""
    from data import IMAGE_TOKEN_INDEX
    slots = int((ids == IMAGE_TOKEN_INDEX).sum())
    if media is None or slots == 0 or model.is_long_features(media):  # long video: one token per placeholder
        return len(ids)
    return len(ids) - slots + slots * media.shape[0] * model.tokens_per_frame()


class Chat:
    """One conversation about one image / video / movie; the visual tokens are re-guided by each new question."""

    def __init__(self, model, tokenizer, media, movie_text=None, compile=False):
        self.model, self.tokenizer, self.media, self.compile = model, tokenizer, media, compile
        self.movie_text = movie_text  # the movie prompt (frames and subtitles) that precedes the first question
        self.messages = []

    def with_media(self, question):
        """The human message carrying the image / video. As the original's chat does, the media always goes with
        the latest question (earlier turns keep only their text), and that question guides its tokens."""
        from data import IMAGE_TOKEN
        if self.media is None:
            return question
        if self.movie_text is not None:
            return self.movie_text + "\n" + question
        return IMAGE_TOKEN + "\n" + question

    def prompt_text(self, question):
        from data import build_prompt
        return build_prompt(self.messages + [("USER", self.with_media(question)), ("ASSISTANT", None)], "vicuna_v1")

    def prompt_ids(self, question):
        from data import tokenize_with_images
        return torch.tensor(tokenize_with_images(self.prompt_text(question), self.tokenizer)), question

    def ask(self, question, max_new_tokens, temperature, top_p, stream=None, generator=None, debug=False):
        ids, human = self.prompt_ids(question)
        n, context = prompt_length(self.model, ids, self.media), self.model.llm.cfg.context_length
        if n >= context:
            frames = f" ({self.media.shape[0]} frames)" if self.media is not None and len(self.media) > 1 else ""
            raise ValueError(f"the prompt is {n} tokens{frames} but the model's context is {context} tokens: use "
                             "fewer frames (--fps, --max-frames) or a shorter question / conversation")
        if n + max_new_tokens > context:  # the answer may use what is left, no more
            max_new_tokens = context - n
            print(f"note: {max_new_tokens} tokens of context left; the answer stops there", file=sys.stderr)
        if debug:
            print(f"[prompt, {n} tokens] {self.prompt_text(question)}", file=sys.stderr, flush=True)
        dev, dtype = self.model.llm.tok_embeddings.weight.device, self.model.llm.tok_embeddings.weight.dtype
        if self.media is not None and self.media.ndim == 4:  # pixels: run EVA once, every later turn reuses it
            self.media = self.model.encode(self.media.to(dev, dtype))
        media = None if self.media is None else [self.media.to(dev, dtype)]
        new, printed = [], ""

        def on_token(tok):
            nonlocal printed
            new.append(int(tok[0]))
            text = self.tokenizer.decode(new)
            if stream is not None and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
                stream(text[len(printed):])
                printed = text
        self.model.generate(ids[None].to(dev), media, [[question]], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, eos_id=self.tokenizer.eos_id,
                            callback=on_token, generator=generator, compile=self.compile)
        final = self.tokenizer.decode(new)
        if stream is not None and len(final) > len(printed):
            stream(final[len(printed):])
        answer = final.strip()
        self.messages += [("USER", human), ("ASSISTANT", answer)]
        return answer


def load_media(model, args):
    """(media tensor or None, movie prompt text or None) for the chosen input."""
    from data import load_image, load_subtitles, load_video, movie_prompt
    from vision import preprocess_frames, preprocess_images
    long_video = model.is_long_video or args.movie
    if args.image is not None:
        pad = model.hf_config.get("image_aspect_ratio") == "pad"
        return preprocess_images([load_image(args.image)], model.image_size, pad_to_square=pad), None
    if args.video is None and args.features is None:
        return None, None
    if args.video is not None and not long_video:
        frames, _ = load_video(args.video, fps=args.fps, max_frames=args.max_frames)
        return preprocess_frames(frames, model.image_size), None
    if args.features is not None:
        features, times = read_feature_cache(args.features)
    else:
        features, times = movie_features(model, args.video, args)
    if features.shape[-1] != model.mm_hidden_size:
        raise ValueError(f"features are {features.shape[-1]} wide but the model expects {model.mm_hidden_size}")
    subtitles = load_subtitles(args.subtitles) if args.subtitles else []
    return features[:, 1:], movie_prompt(subtitles, times, model.video_token)


def check_media(args):
    """Open the media files before the model loads (minutes for a 7B): a wrong path or a broken file fails at
    once. Decodes only the first frame of a video."""
    from data import iter_video, load_image, load_subtitles
    if args.image is not None:
        load_image(args.image)
    if args.video is not None:
        frames = iter_video(args.video, fps=args.fps)
        next(frames)  # a video stream without a decodable frame raises here
        frames.close()
    if args.features is not None and not args.features.is_file():
        raise FileNotFoundError(f"feature cache {args.features} does not exist (write one with --video on a "
                                "long-video model)")
    if args.subtitles is not None:
        load_subtitles(args.subtitles)


def lora_base(lora_dir: Path) -> Path:
    """The checkpoint a LoRA run names as its base (adapter_config.json's base_model_name_or_path), when that
    directory exists here; otherwise the user must say it."""
    from lora import read_adapter_config
    from checkpoint import is_hub_id
    named = read_adapter_config(lora_dir).get("base_model_name_or_path")
    if named and ((Path(named) / "config.json").is_file() or is_hub_id(named)):
        return named
    where = f" (its adapter_config.json names {named}, which is not a checkpoint directory here)" if named else ""
    raise ValueError(f"which checkpoint did the LoRA run {lora_dir} train on?{where} Pass --model-base DIR")


def load_model(args, load_vision=True):
    """(model, tokenizer, checkpoint path) as the command line asks: --model-path (or the tiny model in
    out/shapes), a LoRA run merged on load, fused projections on CUDA, --quantize. serve.py loads through it too."""
    from data import Tokenizer
    from model import LlamaVID
    model_path, lora_dir, model_base = args.model_path, getattr(args, "lora", None), getattr(args, "model_base", None)
    if lora_dir is None and model_path is not None and (Path(model_path) / "adapter_config.json").exists():
        lora_dir, model_path = model_path, None  # the original's convention: --model-path LORA --model-base BASE
    if lora_dir is not None:
        model_path = model_base or model_path or lora_base(lora_dir)
    elif model_path is None:
        if not (DEFAULT_MODEL / "config.json").exists():
            raise ValueError("no --model-path given and no trained tiny model in out/shapes "
                             "(train one with: python train.py config/shapes.py)")
        model_path = DEFAULT_MODEL
    from checkpoint import checkpoint_dir, is_hub_id
    download = is_hub_id(model_path)  # a released model by Hub id: its EVA weights and BERT vocabulary come too
    model_path, lora_dir = checkpoint_dir(model_path), lora_dir and checkpoint_dir(lora_dir)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if lora_dir is not None:
        from lora import load_lora_model
        base = model_path
        model = load_lora_model(lora_dir, base, vision_path=args.vision_path, bert_path=args.bert_path,
                                dtype=dtype, device=device, load_vision=load_vision)
        tokenizer = Tokenizer(lora_dir if (lora_dir / "tokenizer.model").exists() else base)
    else:
        model = LlamaVID.from_pretrained(model_path, vision_path=args.vision_path, bert_path=args.bert_path,
                                         dtype=dtype, device=device, load_vision=load_vision, download=download)
        tokenizer = Tokenizer(model_path)
    if device.type == "cuda":
        model.llm.fuse()  # stacked q/k/v and gate/up projections: faster decoding (see LLaMA.fuse)
    if args.quantize:
        from quantize import quantize_model
        quantize_model(model.llm, args.quantize, device=device)
    return model, tokenizer, model_path


def main(argv=None):
    args = parse_args(argv)
    check_media(args)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_model(args, load_vision=args.features is None)
    movie = model.is_long_video or args.movie or args.features is not None
    if args.subtitles is not None and not (movie and (args.video or args.features)):
        raise ValueError("--subtitles go with a long video: give --video with a long-video checkpoint (or --movie), "
                         "or --features")
    media, movie_text = load_media(model, args)
    temperature = args.temperature if args.temperature is not None else (0.6 if movie else 0.2)
    top_p = args.top_p if args.top_p is not None else (0.9 if movie else 0.7)
    chat = Chat(model, tokenizer, media, movie_text, compile=args.compile)

    def stream(text):
        print(text, end="", flush=True)

    if args.question is not None:
        chat.ask(args.question, args.max_new_tokens, temperature, top_p, stream, debug=args.debug)
        print()
        return 0
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            question = ""
        if not question:
            return 0
        print("ASSISTANT: ", end="", flush=True)
        try:
            chat.ask(question, args.max_new_tokens, temperature, top_p, stream, debug=args.debug)
        except ValueError as e:  # e.g. a question too long for what is left of the context: the chat goes on
            print("\nerror: " + str(e).replace("\n", " "), file=sys.stderr)
            continue
        print()


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, not the source location
    try:
        sys.exit(main())
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
