"""Chat with LLaMA-VID about an image, a short video or an hour-long movie from the command line.

python sample.py --model-path DIR (--image F | --video F | --features F) [--question "..."] [--subtitles F.srt]
"""
import argparse
import sys
from pathlib import Path

import torch

from chat import (ArgumentParser, Chat, add_media_args, add_model_args, check_args, default_sampling,
                  load_model_from_args, run_command)
from media import check_media, load_media


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", type=Path)
    media.add_argument("--video", type=Path)
    media.add_argument("--features", type=Path, help="an EVA feature cache written by an earlier --video run")
    p.add_argument("--question", default=None, help="ask once and exit; without it, an interactive chat")
    p.add_argument("--subtitles", type=Path, default=None, help=".srt subtitles of the movie")
    p.add_argument("--movie", action="store_true", help="use the long-video prompt even for a short-video model")
    add_media_args(p)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.2; 0.6 for movies)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass (default 0.7; 0.9 for movies)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where movie feature caches go (default: beside the video)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="print each full prompt to stderr before its answer")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs) and the prefill")
    return check_args(p, p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    check_media(args.image, args.video, args.features, args.subtitles, args.fps)  # before minutes of loading
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_model_from_args(args, load_vision=args.features is None)
    movie = model.is_long_video or args.movie or args.features is not None
    if args.subtitles is not None and not (movie and (args.video or args.features)):
        raise ValueError("--subtitles go with a long video: give --video with a long-video checkpoint (or --movie), "
                         "or --features")
    media = load_media(model, args.image, args.video, args.features, args.subtitles, args.movie, args.fps,
                       args.max_frames, args.cache_dir)
    temperature, top_p = default_sampling(movie)
    temperature = temperature if args.temperature is None else args.temperature
    top_p = top_p if args.top_p is None else args.top_p
    chat = Chat(model, tokenizer, media, compile=args.compile)

    def ask(question):
        chat.ask(question, args.max_new_tokens, temperature, top_p, on_text=lambda t: print(t, end="", flush=True),
                 debug=args.debug)
        print()

    if args.question is not None:
        ask(args.question)
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
            ask(question)
        except ValueError as e:  # e.g. a question too long for what is left of the context: the chat goes on
            print("\nerror: " + str(e).replace("\n", " "), file=sys.stderr)


if __name__ == "__main__":
    run_command(main)
