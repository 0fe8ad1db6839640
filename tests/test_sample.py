"""sample.py, the command line: its answers are the Python API's for the same inputs (image, video, movie features
with and without subtitles, multi-turn chat), and every bad input ends with one "error:" line, not a traceback."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import cut_after_index

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import Tokenizer, build_prompt, tokenize_with_images  # noqa: E402
from media import (load_image, load_subtitles, load_video, movie_prompt, preprocess_frames,  # noqa: E402
                   preprocess_images, write_video)
from model import IMAGE_TOKEN, LlamaVID, Media  # noqa: E402

QUESTION = "What is moving in the video?"
NEW = 8
CPU = ["--device", "cpu", "--dtype", "float32", "--temperature", "0", "--max-new-tokens", str(NEW)]
SUBTITLE = "The red square runs away"


def run(*args, stdin=None, cwd=ROOT):
    """sample.py as a user runs it (from the repository, or from another working directory): (exit code, stdout,
    stderr)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd, input=stdin,
                       capture_output=True, env=env, timeout=120)
    return p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8")


def run_many(arg_lists, cwd=ROOT):
    """Several runs at once (each spends most of its time importing torch on one core)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda args: run(*args, cwd=cwd), arg_lists))


def config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def image_size(ckpt: Path) -> int:
    return int(config(ckpt)["image_processor"].rstrip("/").rsplit("-", 1)[1])  # ".../clip-patch14-224"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A clip of two shapes moving in opposite directions (2 fps, so fps=1 sampling keeps every other frame)."""
    folder = tmp_path_factory.mktemp("media")
    frames = np.full((6, 48, 64, 3), 30, np.uint8)
    for t in range(6):
        frames[t, 8:20, 4 + 8 * t:16 + 8 * t] = (230, 40, 40)
        frames[t, 28:40, 48 - 6 * t:60 - 6 * t] = (40, 200, 60)
    write_video(folder / "clip.mp4", frames, fps=2)
    (folder / "x.srt").write_text(f"1\n00:00:00,200 --> 00:00:01,500\n{SUBTITLE}\n\n")
    return folder


@pytest.fixture(scope="module")
def models(fixtures):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (LlamaVID.from_pretrained(fixtures / name), Tokenizer(fixtures / name))
        return cache[name]
    return get


def api_answer(model, tokenizer, messages, media, guided, max_new_tokens=NEW):
    """The greedy answer of the Python API (as decoded, before any strip) for a vicuna_v1 conversation."""
    ids = tokenize_with_images(build_prompt(messages, "vicuna_v1"), tokenizer)
    out = model.generate(torch.tensor(ids)[None], [media], [[guided]], max_new_tokens=max_new_tokens,
                         temperature=0.0, eos_id=tokenizer.eos_id)
    return tokenizer.decode(out[0].tolist())


def movie_features(model, clip, size):
    """EVA features of the clip's 1-fps frames, in float16 as the cache (and the original's .pkl) stores them."""
    frames, times = load_video(clip, fps=1.0)
    with torch.no_grad():
        return model.vision(preprocess_frames(frames, size)).half(), times


# ----------------------------------------------------------------------------------------------------------
# the same answers as the Python API

def test_help():
    rc, out, err = run("--help")
    assert rc == 0 and "--model-path" in out and "--video" in out and "--features" in out


def test_video_matches_api(fixtures, models, media):
    ckpt = fixtures / "video"
    model, tok = models("video")
    frames, _ = load_video(media / "clip.mp4", fps=1.0)
    want = api_answer(model, tok, [("USER", IMAGE_TOKEN + "\n" + QUESTION), ("ASSISTANT", None)],
                      Media("video", pixels=preprocess_frames(frames, image_size(ckpt))), QUESTION)
    rc, out, err = run("--model-path", ckpt, "--video", media / "clip.mp4", "--question", QUESTION, *CPU)
    assert rc == 0, err
    assert out == want + "\n"


def test_image_matches_api(fixtures, models):
    ckpt, png = fixtures / "image", fixtures / "cases" / "image.png"
    model, tok = models("image")
    pixels = preprocess_images([load_image(png)], image_size(ckpt),
                               pad_to_square=config(ckpt).get("image_aspect_ratio") == "pad")
    question = "Describe the image."
    want = api_answer(model, tok, [("USER", IMAGE_TOKEN + "\n" + question), ("ASSISTANT", None)],
                      Media("image", pixels=pixels), question)
    rc, out, err = run("--model-path", ckpt, "--image", png, "--question", question, *CPU)
    assert rc == 0, err
    assert out == want + "\n"


def test_movie_feature_cache_and_subtitles(fixtures, models, media):
    ckpt, clip = fixtures / "long", media / "clip.mp4"
    model, tok = models("long")
    video_token = int(config(ckpt).get("video_token", 2))
    features, times = movie_features(model, clip, image_size(ckpt))

    def want(subtitles):
        text = movie_prompt(subtitles, times, video_token) + "\n" + QUESTION
        return api_answer(model, tok, [("USER", text), ("ASSISTANT", None)], Media("movie", features=features.float()),
                          QUESTION)

    # first run: features are computed and cached beside the video, under the video's content hash
    rc, out, err = run("--model-path", ckpt, "--video", clip, "--question", QUESTION, *CPU)
    assert rc == 0, err
    assert out == want([]) + "\n"
    digest = hashlib.sha256(clip.read_bytes()).hexdigest()
    caches = list(media.glob("*.safetensors"))
    assert len(caches) == 1 and digest[:16] in caches[0].name, caches
    from safetensors.torch import load_file
    stored = load_file(str(caches[0]))
    assert stored["features"].shape == features.shape
    torch.testing.assert_close(stored["features"].float(), features.float(), rtol=1e-3, atol=1e-3)

    # second run: the cache is used, no frame is encoded again
    rc, out2, err = run("--model-path", ckpt, "--video", clip, "--question", QUESTION, *CPU)
    assert rc == 0, err
    assert "using cached features" in err and "encoding frames" not in err
    assert out2 == out

    # the cache on its own, with subtitles: they are in the prompt and the answer is the API's for that prompt
    rc, out3, err = run("--model-path", ckpt, "--features", caches[0], "--subtitles", media / "x.srt",
                        "--question", QUESTION, "--debug", *CPU)
    assert rc == 0, err
    assert SUBTITLE in err and movie_prompt(load_subtitles(media / "x.srt"), times, video_token) in err
    assert out3 == want(load_subtitles(media / "x.srt")) + "\n"


def test_interactive_chat_is_multi_turn(fixtures, models, media):
    ckpt = fixtures / "video"
    model, tok = models("video")
    frames, _ = load_video(media / "clip.mp4", fps=1.0)
    pixels = Media("video", pixels=preprocess_frames(frames, image_size(ckpt)))
    q1, q2 = "What moves?", "Which way does it go?"
    # as the original's chat: the video goes with the latest question; earlier turns keep their text
    a1 = api_answer(model, tok, [("USER", IMAGE_TOKEN + "\n" + q1), ("ASSISTANT", None)], pixels, q1)
    a2 = api_answer(model, tok, [("USER", q1), ("ASSISTANT", a1.strip()), ("USER", IMAGE_TOKEN + "\n" + q2),
                                 ("ASSISTANT", None)], pixels, q2)
    rc, out, err = run("--model-path", ckpt, "--video", media / "clip.mp4", "--debug", *CPU,
                       stdin=f"{q1}\n{q2}\n".encode())
    assert rc == 0, err
    assert out == f"USER: ASSISTANT: {a1}\nUSER: ASSISTANT: {a2}\nUSER: "
    # the second prompt carries the first exchange
    assert f"USER: {q1} ASSISTANT: {a1.strip()}</s>USER: {IMAGE_TOKEN}\n{q2} ASSISTANT:" in err


# ----------------------------------------------------------------------------------------------------------
# the prompt length is known before the vision tower runs

@pytest.mark.parametrize("name", ["image", "video", "grid", "long"])
def test_prompt_length_matches_the_spliced_prompt(fixtures, models, media, name):
    """chat.prompt_length counts from shapes what model.embed builds (all patches, mean, grid, movie)."""
    import chat
    model, tok = models(name)
    frames, times = load_video(media / "clip.mp4", fps=1.0)
    pixels = Media("video", pixels=preprocess_frames(frames, image_size(fixtures / name)))
    text = IMAGE_TOKEN + "\n" + QUESTION
    if name == "long":  # a movie: cached features and one placeholder per token
        with torch.no_grad():
            pixels = Media("movie", features=model.vision(pixels.pixels))
        text = movie_prompt([], times, int(config(fixtures / name).get("video_token", 2))) + "\n" + QUESTION
    ids = torch.tensor(tokenize_with_images(build_prompt([("USER", text), ("ASSISTANT", None)], "vicuna_v1"), tok))
    with torch.no_grad():
        embeds, _, _ = model.embed(ids[None], [pixels], [[QUESTION]])
    assert chat.prompt_length(model, ids.tolist(), pixels.kind, pixels.frames) == embeds.shape[1]


def test_context_is_checked_before_the_vision_tower(fixtures, models, media, monkeypatch):
    from chat import Chat
    model, tok = models("video")
    frames, _ = load_video(media / "clip.mp4", fps=1.0)
    pixels = Media("video", pixels=preprocess_frames(frames, image_size(fixtures / "video")))
    ids = torch.tensor(tokenize_with_images(
        build_prompt([("USER", IMAGE_TOKEN + "\n" + QUESTION), ("ASSISTANT", None)], "vicuna_v1"), tok))
    with torch.no_grad():
        n = model.embed(ids[None], [pixels], [[QUESTION]])[0].shape[1]

    # room for 3 new tokens: the answer is cut to 3, not refused
    monkeypatch.setattr(model.llm.cfg, "rope_scaling", None)
    monkeypatch.setattr(model.llm.cfg, "max_seq_len", n + 3)
    want = tok.decode(model.generate(ids[None], [pixels], [[QUESTION]], max_new_tokens=3, eos_id=tok.eos_id)[0])
    assert Chat(model, tok, pixels).ask(QUESTION, 100, 0.0, 1.0) == want.strip()

    # no room: refused with the token count, and the vision tower never ran
    class NoVision(torch.nn.Module):
        cfg = model.vision.cfg

        def forward(self, *a, **k):
            raise AssertionError("the vision tower ran for a prompt that cannot fit")
    monkeypatch.setattr(model, "vision", NoVision())
    monkeypatch.setattr(model.llm.cfg, "max_seq_len", n - 1)
    with pytest.raises(ValueError, match=f"{n} tokens.*--fps.*--max-frames"):
        Chat(model, tok, pixels).ask(QUESTION, 8, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# bad input: one "error:" line, no traceback

def assert_user_error(rc, out, err, *words):
    lines = err.strip().splitlines()
    assert rc != 0 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_bad_media(fixtures, media, tmp_path):
    ckpt = fixtures / "video"
    (tmp_path / "x.mp4").write_text("these are notes, not a video\n" * 10)
    (tmp_path / "x.png").write_text("not an image either\n")
    with av.open(str(tmp_path / "audio.m4a"), "w") as container:  # audio only
        stream = container.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    # a video stream whose data is cut off: index (moov) first, then the file ends where the frames begin
    cut_after_index(media / "clip.mp4", tmp_path, 8)

    cases = [("--video", tmp_path / "missing.mp4", "missing.mp4"),
             ("--video", tmp_path / "x.mp4", "x.mp4"),
             ("--video", tmp_path / "audio.m4a", "no video stream"),
             ("--video", tmp_path / "cut.mp4", "no decodable frame"),
             ("--image", tmp_path / "x.png", "x.png"),
             ("--features", tmp_path / "x.mp4", "x.mp4")]
    results = run_many([("--model-path", ckpt, flag, path, "--question", "hi", *CPU) for flag, path, _ in cases])
    for (_, _, word), result in zip(cases, results):
        assert_user_error(*result, word)


def copy_checkpoint(fixtures, name, tmp_path):
    ckpt = tmp_path / name
    shutil.copytree(fixtures / name, ckpt)
    for f in ckpt.iterdir():
        f.chmod(0o644)
    return ckpt


def test_bad_checkpoints(fixtures, media, tmp_path):
    side = ["--vision-path", fixtures / "eva_vit_g.pth", "--bert-path", fixtures / "bert-base-uncased"]
    cases = [("config.json", "config.json"), ("*.bin*", "no weights"), ("tokenizer.model", "tokenizer.model")]
    runs = []
    for remove, _ in cases:
        ckpt = copy_checkpoint(fixtures, "video", tmp_path / remove.replace("*", "_"))
        for f in ckpt.glob(remove):
            f.unlink()
        runs.append(("--model-path", ckpt, *side, "--video", media / "clip.mp4", "--question", "hi", *CPU))
    for (_, word), result in zip(cases, run_many(runs)):
        assert_user_error(*result, word)


def test_vision_weights_of_another_width(fixtures, media, tmp_path):
    sd = torch.load(fixtures / "eva_vit_g.pth", map_location="cpu", weights_only=True)
    width = sd["pos_embed"].shape[-1]
    wide = width + 88  # one more 88-wide head: a consistent EVA, just not the one the checkpoint was trained with

    def grow(t):
        for d, n in enumerate(t.shape):
            if n in (width, 3 * width):  # 3 * width: q, k, v stacked; each grows
                parts = t.unflatten(d, (n // width, width))
                pad = torch.zeros(*parts.shape[:d + 1], wide - width, *parts.shape[d + 2:], dtype=t.dtype)
                t = torch.cat([parts, pad], d + 1).flatten(d, d + 1)
        return t
    torch.save({k: grow(v) for k, v in sd.items()}, tmp_path / "eva_wide.pth")
    assert config(fixtures / "video")["mm_hidden_size"] == width
    assert_user_error(*run("--model-path", fixtures / "video", "--vision-path", tmp_path / "eva_wide.pth",
                           "--video", media / "clip.mp4", "--question", "hi", *CPU), str(wide), "mm_hidden_size")


def with_context(fixtures, models, media, tmp_path, room):
    """(n, a copy of the video checkpoint whose context is n + room tokens, the flags that find its EVA and BERT
    files) where n is the length of the clip's prompt with the question "hi"."""
    model, tok = models("video")
    frames, _ = load_video(media / "clip.mp4", fps=1.0)
    pixels = Media("video", pixels=preprocess_frames(frames, image_size(fixtures / "video")))
    ids = tokenize_with_images(build_prompt([("USER", IMAGE_TOKEN + "\nhi"), ("ASSISTANT", None)], "vicuna_v1"), tok)
    with torch.no_grad():
        n = model.embed(torch.tensor(ids)[None], [pixels], [["hi"]])[0].shape[1]
    ckpt = copy_checkpoint(fixtures, "video", tmp_path)
    cfg = config(ckpt)
    cfg["max_position_embeddings"], cfg["rope_scaling"] = n + room, None
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return n, ckpt, ["--vision-path", fixtures / "eva_vit_g.pth", "--bert-path", fixtures / "bert-base-uncased"]


def test_prompt_longer_than_context(fixtures, models, media, tmp_path):
    n, ckpt, side = with_context(fixtures, models, media, tmp_path, -1)
    assert_user_error(*run("--model-path", ckpt, *side, "--video", media / "clip.mp4", "--question", "hi", *CPU),
                      f"{n} tokens", "--fps", "--max-frames")


def test_quantized_answers_run(fixtures, media):
    """--quantize int8 / int4 (the original's --load-8bit / --load-4bit) answer through the same path."""
    for mode in ("int8", "int4"):
        rc, out, err = run("--model-path", fixtures / "video", "--video", media / "clip.mp4", "--question", "What?",
                           "--quantize", mode, *CPU)
        assert rc == 0 and "Traceback" not in err, err
        assert out.strip()


def test_bad_options_and_subtitles(fixtures, media, tmp_path):
    """Numbers that make no sense are refused in one line before anything loads; a subtitle file whose timestamps
    cannot be read keeps its good cues and warns about the rest (they used to vanish without a word)."""
    ckpt = fixtures / "video"
    cases = [(["--fps", "inf"], "--fps"), (["--fps", "nan"], "--fps"), (["--temperature", "nan"], "--temperature"),
             (["--temperature", "-1"], "--temperature"), (["--temperature", "inf"], "--temperature"),
             (["--top-p", "nan"], "--top-p"), (["--max-frames", "0"], "--max-frames")]
    runs = [("--model-path", ckpt, "--video", media / "clip.mp4", "--question", "hi", *CPU, *flags)
            for flags, _ in cases]
    for (_, word), result in zip(cases, run_many(runs)):
        assert_user_error(*result, word)

    srt = tmp_path / "broken.srt"
    srt.write_text("1\n00:00:00,200 --> 00:00:01,500\nfirst\n\n2\n00:00:02,000 -> 00:00:03,000\nlost\n\n"
                   "3\n00:00:04,000 --> 00:00:03,000\nbackwards\n\n4\n00:00:05,000 --> 00:00:06,000\nlast\n")
    with pytest.warns(UserWarning, match=r"2 subtitle cue\(s\) skipped.*line 6.*line 10"):
        subtitles = load_subtitles(srt)
    assert [s["text"] for s in subtitles] == ["first", "last"]


def test_interactive_chat_survives_a_question_too_long(fixtures, models, media, tmp_path):
    """A question that does not fit what is left of the context is refused in one line, and the chat goes on."""
    _, ckpt, side = with_context(fixtures, models, media, tmp_path, 40)
    long_question = " ".join(["why"] * 200)
    rc, out, err = run("--model-path", ckpt, *side, "--video", media / "clip.mp4", *CPU,
                       stdin=f"{long_question}\nhi\n".encode())
    assert rc == 0 and "Traceback" not in err, err
    assert err.count("error:") == 1 and "context" in err
    assert out.count("ASSISTANT: ") == 2 and out.endswith("USER: ")


def test_lora_commands_from_an_empty_directory(fixtures, media, tmp_path):
    """Every way the README gives a LoRA run (ours: --lora RUN [--model-base BASE]; the original's: --model-path RUN
    --model-base BASE; the base named in adapter_config.json) answers as the Python API does with that base, run from
    a directory with no out/ in it."""
    from lora import LoRAConfig, apply_lora, load_lora_model, save_adapters
    base = fixtures / "video"
    model = LlamaVID.from_pretrained(base)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in apply_lora(model, LoRAConfig.tiny(r=4)):
            p.add_(torch.randn_like(p) * 0.05)
    lora_run = tmp_path / "lora_run"
    save_adapters(model, lora_run, LoRAConfig.tiny(r=4), base_model=str(base))
    (lora_run / "config.json").write_text(json.dumps(model.hf_config))
    merged = load_lora_model(lora_run, base, vision_path=fixtures / "eva_vit_g.pth",
                             bert_path=fixtures / "bert-base-uncased")
    tok = Tokenizer(base)
    frames, _ = load_video(media / "clip.mp4", fps=1.0)
    pixels = Media("video", pixels=preprocess_frames(frames, image_size(base)))
    want = api_answer(merged, tok, [("USER", IMAGE_TOKEN + "\n" + QUESTION), ("ASSISTANT", None)], pixels, QUESTION)
    plain = api_answer(LlamaVID.from_pretrained(base), tok, [("USER", IMAGE_TOKEN + "\n" + QUESTION),
                                                             ("ASSISTANT", None)], pixels, QUESTION)
    assert want != plain  # the adapters change the answer, so the base alone cannot pass

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    side = ["--video", media / "clip.mp4", "--question", QUESTION, *CPU]
    forms = [("--lora", lora_run, "--model-base", base), ("--model-path", lora_run, "--model-base", base),
             ("--model-path", base, "--lora", lora_run), ("--lora", lora_run)]
    for form, (rc, out, err) in zip(forms, run_many([(*form, *side) for form in forms], cwd=empty)):
        assert rc == 0, (form, err)
        assert out == want + "\n", form
    assert not (empty / "out").exists()

    (lora_run / "adapter_config.json").write_text(json.dumps(
        {**json.loads((lora_run / "adapter_config.json").read_text()), "base_model_name_or_path": "/nonexistent/base"}))
    assert_user_error(*run("--lora", lora_run, *side, cwd=empty), "--model-base")
