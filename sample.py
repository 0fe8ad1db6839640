"""Chat with LLaMA-VID about an image, a short video or an hour-long movie from the command line.

python sample.py --model-path DIR (--image F | --video F | --features F) [--question "..."] [--subtitles F.srt]
"""
import argparse
import sys
from pathlib import Path

import torch

DEFAULT_MODEL = Path("out/shapes")  # the tiny model config/shapes.py trains, used when no --model-path is given


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=None, help="LLaMA-VID checkpoint directory")
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
    p.add_argument("--cache-dir", type=Path, default=None, help="where movie feature caches go (default: beside the video)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pick_device(name):
    if name != "auto":
        return torch.device(name)
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
def extract_features(model, frames, batch_size=32):
    """EVA features (T, 1+N, W) of decoded frames, in batches, with a progress bar."""
    from tqdm import tqdm
    from vision import preprocess_frames
    dev, dtype = model.llm.output.weight.device, model.llm.output.weight.dtype
    out = []
    for i in tqdm(range(0, len(frames), batch_size), desc="encoding frames", unit="batch", file=sys.stderr):
        pixels = preprocess_frames(frames[i:i + batch_size], model.image_size).to(dev, dtype)
        out.append(model.vision(pixels).to("cpu", torch.float16))
    return torch.cat(out)


def feature_cache_path(video: Path, cache_dir, digest: str) -> Path:
    folder = Path(cache_dir) if cache_dir else video.parent
    return folder / f"{video.stem}.{digest[:16]}.features.safetensors"


def movie_features(model, video: Path, args):
    """(features (T, 1+N, W), frame times) of a long video, computed once and cached by content hash."""
    from safetensors.torch import load_file, save_file
    from data import content_hash, load_video
    cache = feature_cache_path(video, args.cache_dir, content_hash(video))
    if cache.exists():
        print(f"using cached features {cache}", file=sys.stderr)
        return read_feature_cache(cache)
    frames, times = load_video(video, fps=args.fps, max_frames=args.max_frames)
    features = extract_features(model, frames)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    save_file({"features": features.contiguous(), "times": torch.tensor(times, dtype=torch.float64)}, str(tmp),
              metadata={"video": str(video), "fps": str(args.fps)})
    tmp.replace(cache)
    print(f"features cached in {cache}", file=sys.stderr)
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
        raise ValueError(f"{path} is not a feature cache written by sample.py (needs 'features' (T, 1+N, W) and 'times')")
    return d["features"], d["times"].tolist()


class Chat:
    """One conversation about one image / video / movie; the visual tokens are re-guided by each new question."""

    def __init__(self, model, tokenizer, media, movie_text=None):
        self.model, self.tokenizer, self.media = model, tokenizer, media
        self.movie_text = movie_text  # the movie prompt (frames and subtitles) that precedes the first question
        self.messages = []

    def first_message(self, question):
        from data import IMAGE_TOKEN
        if self.media is None:
            return question
        if self.movie_text is not None:
            return self.movie_text + "\n" + question
        return IMAGE_TOKEN + "\n" + question

    def prompt_ids(self, question):
        from data import build_prompt, tokenize_with_images
        human = self.first_message(question) if not self.messages else question
        messages = self.messages + [("USER", human), ("ASSISTANT", None)]
        return torch.tensor(tokenize_with_images(build_prompt(messages, "vicuna_v1"), self.tokenizer)), human

    def ask(self, question, max_new_tokens, temperature, top_p, stream=None, generator=None):
        ids, human = self.prompt_ids(question)
        dev = self.model.llm.output.weight.device
        media = None if self.media is None else [self.media.to(dev, self.model.llm.output.weight.dtype)]
        new, printed = [], ""

        def on_token(tok):
            nonlocal printed
            new.append(int(tok[0]))
            text = self.tokenizer.decode(new)
            if stream is not None and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
                stream(text[len(printed):])
                printed = text
        try:
            self.model.generate(ids[None].to(dev), media, [[question]], max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, eos_id=self.tokenizer.eos_id,
                                callback=on_token, generator=generator)
        except ValueError as e:
            if "context" in str(e):
                raise ValueError(f"{e}. Use fewer frames (--fps, --max-frames) or a shorter question") from None
            raise
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


def main(argv=None):
    args = parse_args(argv)
    from data import Tokenizer
    from model import LlamaVID
    model_path = args.model_path
    if model_path is None:
        if not (DEFAULT_MODEL / "config.json").exists():
            raise ValueError("no --model-path given and no trained tiny model in out/shapes "
                             "(train one with: python train.py config/shapes.py)")
        model_path = DEFAULT_MODEL
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    long_video = args.movie or args.features is not None
    model = LlamaVID.from_pretrained(model_path, vision_path=args.vision_path, bert_path=args.bert_path,
                                     dtype=dtype, device=device, load_vision=args.features is None)
    tokenizer = Tokenizer(model_path)
    media, movie_text = load_media(model, args)
    movie = model.is_long_video or long_video
    temperature = args.temperature if args.temperature is not None else (0.6 if movie else 0.2)
    top_p = args.top_p if args.top_p is not None else (0.9 if movie else 0.7)
    chat = Chat(model, tokenizer, media, movie_text)

    def stream(text):
        print(text, end="", flush=True)

    if args.question is not None:
        chat.ask(args.question, args.max_new_tokens, temperature, top_p, stream)
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
        chat.ask(question, args.max_new_tokens, temperature, top_p, stream)
        print()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
