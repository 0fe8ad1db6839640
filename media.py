"""Media on their way to the model: images, videos (PyAV, sampled at a given fps on the stream's clock), .srt
subtitles and the movie prompt, the original's CLIP preprocessing, the frames -> EVA features pipeline, and the
one feature-cache format of long videos. What each loaded item is (image, video or movie) is said here, in a
model.Media, and carried to the model."""
import hashlib
import math
import pickle
import queue
import re
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from model import IMAGE_TOKEN, Media

# OpenAI CLIP statistics, as in the original's clip-patch14-{224,336} preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------------
# images and videos

def load_image(path):
    """An image file as an RGB PIL image. EXIF orientation is not applied, as in the original (LLaVA's
    Image.open(...).convert("RGB")), so the model sees the pixels it was trained and evaluated on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path} does not exist; check the path (and the image folder "
                                f"that the data file's paths are relative to)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() reads the pixels, so the file can be closed here
    except PermissionError:
        raise
    except (OSError, SyntaxError) as e:  # UnidentifiedImageError is an OSError; so is a truncated file
        raise ValueError(f"{path} is not an image Pillow can read ({e}); re-save it as PNG or JPEG") from None


# Frame sampling. The original reads videos with decord and keeps frame indices 0, g, 2g, ... with
# g = round(average fps / fps), calling frame i's time i / average fps. For a constant-rate video whose rate is
# a multiple of `fps` that is exactly "the first frame at or after each k / fps seconds". We apply that rule to
# the stream's real timestamps, so variable-frame-rate files (phones, screen recordings) and rates like 29.97
# or 15 at fps=2 stay on the clock instead of drifting. When one frame is the first at or after several
# targets (a gap in a variable-rate file) it is kept once: we keep the first frame of every 1/fps-wide time
# slot that has one, and return each kept frame's true time.
VIDEO_TIME_EPS = 1e-3  # s; containers round timestamps (Matroska to the millisecond): this early still counts


def _open_video(path):
    """(container, video stream) of a file, or an error saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path} does not exist; check the path (and the video folder "
                                f"that the data file's paths are relative to)")
    try:
        container = av.open(str(path))
    except PermissionError:
        raise
    except av.error.FFmpegError as e:
        raise ValueError(f"{path} is not a video FFmpeg can open ({e}); check that the file is complete and is a "
                         f"video (mp4, mkv, webm, avi, ...)") from None
    # the cover art of an audio file is a one-picture "video" stream: not a video
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise ValueError(f"{path} has no video stream (it holds {', '.join(kinds)}); pass a video file")
    best = container.streams.best("video")  # what decord takes: FFmpeg's av_find_best_stream
    return container, (best if any(best is s for s in streams) else streams[0])


def _sampled(items, fps):
    """Keep, from (item, t) pairs in presentation order, the first of every 1/fps-wide time slot (all items
    when fps is None). Items before the stream start (t < 0) are never kept."""
    next_slot = 0
    for item, t in items:
        if t + VIDEO_TIME_EPS < 0:
            continue
        slot = math.floor((t + VIDEO_TIME_EPS) * fps) if fps is not None else next_slot
        if slot >= next_slot:
            next_slot = slot + 1
            yield item, t


def _decoded(container, stream, path):
    """(frame, seconds since the stream start) for every decoded frame. A decoding error after some frames (a
    truncated download) ends the video with a warning; one before any frame is an error."""
    origin, rate, t, n = stream.start_time, stream.average_rate or stream.guessed_rate or 25, None, 0
    try:
        for frame in container.decode(stream):
            if frame.pts is None:  # no timestamp (some AVI / raw streams): assume the nominal rate
                t = 0.0 if t is None else t + float(1 / rate)
            else:
                origin = frame.pts if origin is None else origin
                t = float((frame.pts - origin) * (frame.time_base or stream.time_base))
            n += 1
            yield frame, t
    except av.error.FFmpegError as e:
        if n == 0:
            raise ValueError(f"no decodable frame in {path}: it has a video stream but decoding failed ({e}); "
                             f"the file is probably truncated or damaged: re-download or re-encode it") from None
        warnings.warn(f"decoding {path} stopped after {n} frames ({e}); the file may be truncated: using those")


def _packet_times(path):
    """Timestamps of the video's frames read from its packets without decoding them, to count in advance how
    many frames the sampling keeps (max_frames spreads its picks over that count)."""
    container, stream = _open_video(path)
    with container:
        stamps = []
        try:
            for packet in container.demux(stream):
                if packet.size:  # the demuxer ends with an empty flush packet
                    stamps.append(packet.pts if packet.pts is not None else packet.dts)
        except av.error.FFmpegError:
            pass  # a truncated file: the decoding pass warns about it
        if any(s is None for s in stamps):  # no timestamps: assume the nominal rate
            rate = stream.average_rate or stream.guessed_rate or 25
            return [i / float(rate) for i in range(len(stamps))]
        origin = stream.start_time if stream.start_time is not None else min(stamps, default=0)
        return sorted(float((s - origin) * stream.time_base) for s in stamps)


def _upright(frame):
    """The frame as an RGB uint8 array turned the way players show it. Phones store portrait video as landscape
    pixels plus a display matrix; we apply it as FFmpeg's autorotate does, mirror images included."""
    image = frame.to_ndarray(format="rgb24")
    side = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)  # (a mapping by type, in every PyAV)
    if side is None:
        return image
    matrix = np.frombuffer(bytes(side), np.int32)
    # FFmpeg's layout [a b u; c d v; x y w] sends a stored pixel (p, q) (q pointing down) to the displayed
    # (a p + c q, b p + d q). Angles between quarter turns snap to the nearest one.
    a, b, c, d = (int(v) for v in matrix[[0, 1, 3, 4]])
    if abs(a) + abs(d) >= abs(b) + abs(c):
        if a < 0:
            image = image[:, ::-1]
        if d < 0:
            image = image[::-1]
    else:  # a quarter turn: stored rows become displayed columns
        image = image.transpose(1, 0, 2)  # image[p, q]: displayed column from q (c), row from p (b)
        if c < 0:
            image = image[:, ::-1]
        if b < 0:
            image = image[::-1]
    return np.ascontiguousarray(image)


def iter_video(path, fps=1.0, max_frames=None):
    """The sampled frames of a video one at a time: an iterator of (uint8 (H, W, 3) upright RGB, seconds from
    the stream start). Only the frames kept are converted to RGB, so any length of video streams through.

    fps: frames per second to keep (see the sampling rule above); None keeps every frame.
    max_frames: at most this many, spread evenly over the sampled ones (np.linspace over their indices, first
    and last included); costs one extra pass over the file's packets, not a second decode."""
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be a positive number of frames per second (or None for all frames), got {fps!r}")
    if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
        raise ValueError(f"max_frames must be a positive integer (or None for no cap), got {max_frames!r}")
    keep = None
    if max_frames is not None:
        n = count_frames(path, fps)
        if n > max_frames:
            keep = set(np.linspace(0, n - 1, int(max_frames), dtype=int).tolist())
            last = max(keep)
    container, stream = _open_video(path)  # here, so a bad path raises at the call, not at the first frame
    stream.thread_type = "AUTO"  # frame and slice threads

    def frames():
        with container:
            n_kept = 0
            for i, (frame, t) in enumerate(_sampled(_decoded(container, stream, path), fps)):
                if keep is not None and i not in keep:
                    if i > last:
                        break
                    continue
                n_kept += 1
                yield _upright(frame), t
            if n_kept == 0:
                raise ValueError(f"no decodable frame in {path}: its video stream gave no frame; the file is "
                                 f"probably truncated or damaged: re-download or re-encode it")
    return frames()


def load_video(path, fps=1.0, max_frames=None):
    """A video's sampled frames (uint8 (T, H, W, 3), upright RGB) and their times in seconds from the stream
    start (the original's `frame_time`). The defaults give the original's 1 frame per second."""
    frames, times = [], []
    for frame, t in iter_video(path, fps, max_frames):
        if frames and frame.shape != frames[0].shape:
            raise ValueError(f"the frames of {path} change size mid-video ({frames[0].shape[:2]} then "
                             f"{frame.shape[:2]}); use iter_video and resize each frame")
        frames.append(frame)
        times.append(t)
    return np.stack(frames), times


VFR_TIME_BASE = Fraction(1, 30000)  # timestamps of variable-rate files we write: ms, 1/24, 1/25, 1/30 s exact


def write_video(path, frames, fps, times=None, codec="libx264", rotation=0, hflip=False, options=None):
    """Encode uint8 RGB frames (T, H, W, 3) into a video file; the container comes from the suffix (.mp4, .mkv,
    .avi, ...). Odd sizes work: libx264 then stores yuv444p (yuv420p needs even sizes), mpeg4 takes them as is.

    times: per-frame timestamps in seconds, strictly increasing, for a variable-frame-rate file (fps is then
    only the nominal rate in the header); by default frame i is at i / fps.
    rotation, hflip: a display matrix telling players (and load_video) to turn the stored pixels `rotation`
    degrees counter-clockwise, then mirror them, as phones do for portrait video (mp4 / mov only).
    options: encoder options, e.g. {"crf": "18"} or {"qp": "0"} (lossless) for libx264."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty uint8 array (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    if times is not None:
        times = [float(t) for t in times]
        if len(times) != len(frames) or any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"times must give one strictly increasing timestamp per frame ({len(frames)} frames)")
    try:
        av.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        raise ValueError(f"this FFmpeg build has no {codec!r} encoder; use libx264 or mpeg4") from None
    height, width = frames.shape[1:3]
    odd = width % 2 or height % 2
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if codec == "libx264" and odd else "yuv420p"
        stream.options = dict(options or {})
        stream.codec_context.thread_count = 1  # one encoder thread: the same frames always give the same bytes
        if times is not None:
            stream.codec_context.time_base = VFR_TIME_BASE
        if rotation or hflip:
            stream.set_display_rotation(rotation, hflip=hflip)
        for i, image in enumerate(frames):
            frame = yuv_frame(image, stream.pix_fmt)
            if times is None:
                frame.pts = i
            else:
                frame.pts, frame.time_base = round(times[i] / VFR_TIME_BASE), VFR_TIME_BASE
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def yuv_frame(image, pix_fmt):
    """An RGB image as a frame in the encoder's pixel format, converted here rather than by FFmpeg's swscale,
    whose SIMD conversion can round differently from one process to the next (the same clip then encodes to other
    bytes). BT.601 with the limited range, as swscale's default and what decoding assumes; 4:2:0 chroma is the
    mean of each 2 x 2 block."""
    if pix_fmt not in ("yuv420p", "yuv444p") or (pix_fmt == "yuv420p" and (image.shape[0] % 2 or image.shape[1] % 2)):
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    r, g, b = np.moveaxis(image.astype(np.float64), -1, 0)
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    to_uint8 = lambda c: np.clip(np.rint(c), 0, 255).astype(np.uint8)  # noqa: E731
    if pix_fmt == "yuv444p":
        return av.VideoFrame.from_ndarray(to_uint8(np.stack([y, u, v])), format="yuv444p")
    H, W = y.shape
    half = lambda c: to_uint8(c.reshape(H // 2, 2, W // 2, 2).mean((1, 3))).ravel()  # noqa: E731
    planes = np.concatenate([to_uint8(y).ravel(), half(u), half(v)])  # the layout PyAV reads: Y, then U, then V
    return av.VideoFrame.from_ndarray(planes.reshape(H * 3 // 2, W), format="yuv420p")


def content_hash(path):
    """sha256 of a file's bytes (read in 1 MiB blocks): the key of feature caches."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash {path}: it does not exist")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Subtitles and the hour-long video prompt (scripts/extra_tool/extract_video_features_subtitles.py builds the
# text, llamavid/serve/run_llamavid_movie.py wraps it). The original transcribes the audio with Whisper; we
# read .srt files, which give the same start/end/text records.
SRT_TIME = re.compile(r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})\s*-->\s*(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})")
SRT_MARKUP = re.compile(r"<[^>]*>|\{\\[^}]*\}")  # <i>, <font color=..>, and ASS overrides such as {\an8}
MOVIE_START = "Below is a movie. Memorize the content and answer my question after watching this movie."
MOVIE_END = "Now the movie end."


def _srt_seconds(hours, minutes, seconds, fraction):
    return round(int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(fraction) / 10 ** len(fraction), 3)


def load_subtitles(srt_path):
    """An .srt file as [{"start_time", "end_time", "text"}] (seconds, floats), sorted by start time. A cue's
    lines are joined with a space and markup is stripped. UTF-8 (BOM tolerated) or UTF-16 with a BOM; other
    bytes are read as Latin-1."""
    path = Path(srt_path)
    if not path.is_file():
        raise FileNotFoundError(f"subtitle file not found: {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    cues, cue, broken = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        stamp = SRT_TIME.match(line)
        backwards = stamp and _srt_seconds(*stamp.groups()[4:]) < _srt_seconds(*stamp.groups()[:4])
        if backwards:
            stamp = None
        if not stamp and "->" in line:
            broken.append(f"line {number}: {line[:60]!r}" + (" ends before it starts" if backwards else ""))
            cue = None  # its text goes with no cue rather than onto the previous one
            continue
        if stamp:
            if cue is not None and cue[2] and cue[2][-1].isdigit():
                cue[2].pop()  # the next cue's index, written without a blank line before it
            cue = (_srt_seconds(*stamp.groups()[:4]), _srt_seconds(*stamp.groups()[4:]), [])
            cues.append(cue)
        elif not line:
            cue = None  # a blank line ends a cue; the index line that follows is skipped
        elif cue is not None:
            cue[2].append(line)
    if not cues and text.strip():
        raise ValueError(f"{path} holds no subtitle cues (lines like '00:00:01,500 --> 00:00:03,000'); pass an "
                         f".srt file")
    if broken:
        warnings.warn(f"{path}: {len(broken)} subtitle cue(s) skipped for their timestamps ({'; '.join(broken[:3])}); "
                      "write them as 'HH:MM:SS,mmm --> HH:MM:SS,mmm', the end after the start")
    subtitles = []
    for start, end, lines in cues:
        words = " ".join(SRT_MARKUP.sub("", line) for line in lines).split()
        if words:
            subtitles.append({"start_time": start, "end_time": end, "text": " ".join(words)})
    return sorted(subtitles, key=lambda s: s["start_time"])


def movie_video_input(subtitles, frame_times):
    """The original's load_video_input: one `<image>` per frame, each followed by the texts (space-joined) of
    the subtitles that end after the previous frame and no later than the next one, i.e. a subtitle follows the
    last frame shown before it ends. Subtitles are taken in order and the frame pointer never moves back.
    One deviation: a subtitle ending at or before the first frame goes with that frame (the original's index
    -1 put it after the LAST frame); with frame times from 0 that needs an end time <= 0."""
    if len(frame_times) == 0:
        raise ValueError("movie_video_input needs at least one frame time")
    texts = [[] for _ in frame_times]
    point = 0
    for subtitle in subtitles:
        while point < len(frame_times) and frame_times[point] < subtitle["end_time"]:
            point += 1
        texts[max(point - 1, 0)].append(subtitle["text"])
    return "".join(IMAGE_TOKEN + " ".join(t) for t in texts)


def movie_prompt(subtitles, frame_times, video_token=2):
    """The long-video text of run_llamavid_movie.py: the movie preamble, every frame's `<image>` repeated
    video_token times (the tokens each frame gets) with its subtitles, and the closing sentence.
    video_token=0 gives the original's --pure-text prompt (subtitles only)."""
    if int(video_token) != video_token or video_token < 0:
        raise ValueError(f"video_token must be a non-negative integer (tokens per frame), got {video_token!r}")
    video_input = movie_video_input(subtitles, frame_times)
    return MOVIE_START + video_input.replace(IMAGE_TOKEN, IMAGE_TOKEN * int(video_token)) + MOVIE_END


def movie_message(subtitles, frame_times, question, video_token=2):
    """The whole human message of a movie question (the checkpoints have mm_use_im_start_end off)."""
    return movie_prompt(subtitles, frame_times, video_token) + "\n" + question


# ----------------------------------------------------------------------------- preprocessing
# Matches transformers 4.31 CLIPImageProcessor (size={"shortest_edge": S}, crop S x S, bicubic) step by step:
# uint8 -> PIL bicubic resize of the shortest edge (long edge truncated with int()) -> centre crop on uint8
# -> float64 * (1/255) cast to float32 -> (x - mean) / std in float32.

def expand_to_square(image: Image.Image) -> Image.Image:
    """The original's expand2square: centre the image on a square canvas of the CLIP mean colour."""
    w, h = image.size
    if w == h:
        return image
    fill = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), truncated as the original does
    canvas = Image.new(image.mode, (max(w, h),) * 2, fill)
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def _resize_crop(image: Image.Image, size: int) -> np.ndarray:  # -> uint8 (size, size, 3)
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.asarray(image)[top:top + size, left:left + size]


def _normalize(batch: np.ndarray) -> torch.Tensor:  # uint8 (B, S, S, 3) -> float32 (B, 3, S, S)
    x = (torch.from_numpy(np.ascontiguousarray(batch)).double() * (1 / 255)).float()
    x = (x - torch.tensor(CLIP_MEAN, dtype=torch.float32)) / torch.tensor(CLIP_STD, dtype=torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()


def preprocess_images(images, size, pad_to_square=True) -> torch.Tensor:
    """list of PIL images -> float32 (B, 3, size, size). pad_to_square is image_aspect_ratio == "pad"."""
    out = []
    for image in images:
        image = image.convert("RGB") if image.mode != "RGB" else image
        if pad_to_square:
            image = expand_to_square(image)
        out.append(_resize_crop(image, size))
    return _normalize(np.stack(out))


def resize_frames(frames, size) -> np.ndarray:
    """uint8 RGB video frames (T, H, W, 3), numpy or torch -> uint8 (T, size, size, 3): preprocess_frames before
    its normalisation (what a cache of decoded clips keeps); never padded."""
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 RGB of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == (size, size):
        return frames
    return np.stack([_resize_crop(Image.fromarray(f), size) for f in frames])


def preprocess_frames(frames, size) -> torch.Tensor:
    """uint8 RGB video frames (T, H, W, 3), numpy or torch -> float32 (T, 3, size, size); never padded."""
    return _normalize(resize_frames(frames, size))


LONG_VIDEO_SUFFIXES = (".safetensors", ".pkl")  # a "video" entry of a data file naming a long video's feature cache


# ----------------------------------------------------------------------------------------------------------
# frames -> EVA features, decoding overlapped with the vision tower

@torch.no_grad()
def encode_frames(model, frames, batch_size=32, workers=8, keep_on_device=False, stats=None, progress=True):
    """EVA features (T, 1+N, W) and times of a stream of (frame, seconds), batch by batch, with a progress bar: an
    hour of 720p video never sits decoded in memory at once. model: a LlamaVID (its vision tower and image size).

    The three stages overlap: a thread pulls frames from the iterator (the video decoder), a pool of `workers`
    threads preprocesses batches (PIL and PyAV do their work without the GIL), and this thread feeds the batches to
    EVA in order. Features go to the CPU in float16 (to cache them), or stay on the device with keep_on_device. An
    error raised by the frame iterator (a broken file, a caller's limit) is raised here. stats, a dict, receives
    decode_s: the seconds spent inside the frame iterator (decoding)."""
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
    bar = tqdm(desc="encoding frames", unit="frame", file=sys.stderr, disable=not progress)

    def encode(job):
        pixels, n = job[0].result(), job[1]
        feats = model.encode(pixels)
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


# ----------------------------------------------------------------------------------------------------------
# the feature cache of a long video: one format for the movie command line, the server and training data

LONG_VIDEO_SUFFIXES = (".safetensors", ".pkl")  # a "video" entry of a data file naming a long video's feature cache


def write_feature_cache(path, features, times=None, video_input=None, source=""):
    """Write a long video's features: safetensors with "features" (T, 1+N, W) in float16, cls first, "times" (T,)
    in seconds when known, and in the metadata the original's frame-and-subtitle text (video_input, one <image> a
    frame; training data) and where the features came from. Through a temporary file: never half a cache."""
    path = Path(path)
    tensors = {"features": features.to(torch.float16).contiguous()}
    if times is not None:
        tensors["times"] = torch.tensor(list(times), dtype=torch.float64)
    meta = {"source": str(source)}
    if video_input is not None:
        meta["video_input"] = str(video_input)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_feature_cache(path) -> Media:
    """A long video's features as a movie Media (features float32, cls first; times and the original's
    video_input text when the file has them): our .safetensors cache, or the original extractor's .pkl, read
    through a restricted unpickler that rebuilds numpy arrays and strings only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {path} does not exist (write one with --video on a long-video model)")
    if path.suffix == ".pkl":
        info = read_feature_pkl(path)
        features, times, video_input = torch.from_numpy(info["feats"]), None, str(info.get("inputs", "")) or None
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, names = f.metadata() or {}, set(f.keys())
                features = f.get_tensor("features") if "features" in names else None
                times = f.get_tensor("times").tolist() if "times" in names else None
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a feature cache ({e})") from None
        video_input = meta.get("video_input") or None
    if features is None or features.ndim != 3:
        raise ValueError(f"{path} is not a feature cache: it needs 'features' of shape (frames, 1 + patches, width)")
    if times is not None and len(times) != len(features):
        raise ValueError(f"{path}: {len(times)} frame times for {len(features)} frames; the cache is damaged")
    return Media("movie", features=features.float(), times=times, text=video_input)


def read_feature_pkl(path):
    """The original extractor's .pkl ({'feats': ndarray, 'inputs': str}) read without running foreign code:
    only numpy arrays, numbers, strings, lists and dicts may be rebuilt; anything else is refused."""
    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "str"), ("builtins", "dict"),
               ("builtins", "list"), ("builtins", "float"), ("builtins", "int"), ("codecs", "encode")}

    class SafeUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
            return super().find_class(module, name)
    try:
        with open(path, "rb") as f:
            info = SafeUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ValueError(f"{path} is not a plain LLaMA-VID feature file ({e}); only numpy arrays and strings "
                         "are accepted") from None
    if not isinstance(info, dict) or "feats" not in info or not isinstance(info["feats"], np.ndarray):
        raise ValueError(f"{path} holds no 'feats' array: not a LLaMA-VID feature file")
    return info


def import_feature_pkl(pkl_path, out_path=None):
    """Convert an original .pkl feature file to our .safetensors cache once; returns the new path."""
    info = read_feature_pkl(pkl_path)
    out = Path(out_path) if out_path else Path(pkl_path).with_suffix(".safetensors")
    return write_feature_cache(out, torch.from_numpy(np.ascontiguousarray(info["feats"])),
                               video_input=str(info.get("inputs", "")), source=Path(pkl_path).name)


# ----------------------------------------------------------------------------------------------------------
# loading: a file in, a model.Media out

def image_media(path, size, pad_to_square=True) -> Media:
    """An image file, CLIP-preprocessed (padded to a square first when the model was trained so)."""
    return Media("image", pixels=preprocess_images([load_image(path)], size, pad_to_square), times=[0.0])


def video_media(path, size, fps=1.0, max_frames=None) -> Media:
    """A short video's frames sampled at fps (at most max_frames), CLIP-preprocessed."""
    frames, times = load_video(path, fps=fps, max_frames=max_frames)
    return Media("video", pixels=preprocess_frames(frames, size), times=times)


def movie_media(model, video=None, features=None, subtitles=None, fps=1.0, max_frames=None, cache_dir=None) -> Media:
    """A long video as the long-video model takes it: EVA features of every sampled frame (from a feature cache,
    or computed from the video once and cached by content hash beside it or in cache_dir), and the movie prompt of
    its frames and subtitles. features: a cache file given directly."""
    if features is not None:
        media = read_feature_cache(features)
    else:
        cache = Path(cache_dir or Path(video).parent) / f"{Path(video).stem}.{content_hash(video)[:16]}.features.safetensors"
        if cache.is_file():
            print(f"using cached features {cache}", file=sys.stderr)
            media = read_feature_cache(cache)
        else:
            feats, times = encode_frames(model, iter_video(video, fps=fps, max_frames=max_frames))
            media = Media("movie", features=feats.float(), times=times)
            try:
                write_feature_cache(cache, feats, times, source=Path(video).name)
                print(f"features cached in {cache}", file=sys.stderr)
            except OSError as e:  # a read-only folder costs the cache, not the answer
                warnings.warn(f"could not write the feature cache {cache} ({e}); pass --cache-dir to keep it")
    if media.features.shape[-1] != model.mm_hidden_size:
        raise ValueError(f"features are {media.features.shape[-1]} wide but the model expects {model.mm_hidden_size}")
    if subtitles is not None or media.text is None:
        if media.times is None:
            raise ValueError("the feature cache holds neither frame times nor the movie text: write it again from "
                             "the video (--video)")
        media.text = movie_prompt(load_subtitles(subtitles) if subtitles else [], media.times, model.video_token)
    return media


def load_media(model, image=None, video=None, features=None, subtitles=None, movie=False, fps=1.0, max_frames=None,
               cache_dir=None, pad_to_square=None):
    """The one way a command line loads media for a model: an image, a short video's frames, or (a long-video
    model, movie=True, or a feature file) a movie. None when nothing is given."""
    if image is not None:
        pad = model.pads_images if pad_to_square is None else pad_to_square
        return image_media(image, model.image_size, pad)
    if features is not None or (video is not None and (movie or model.is_long_video)):
        return movie_media(model, video, features, subtitles, fps, max_frames, cache_dir)
    if video is not None:
        return video_media(video, model.image_size, fps, max_frames)
    return None


def check_media(image=None, video=None, features=None, subtitles=None, fps=1.0):
    """Open the media files before a model loads (minutes for a 7B): a wrong path or a broken file fails at once.
    Decodes only the first frame of a video."""
    if image is not None:
        load_image(image)
    if video is not None:
        frames = iter_video(video, fps=fps)
        next(frames)  # a video stream without a decodable frame raises here
        frames.close()
    if features is not None and not Path(features).is_file():
        raise FileNotFoundError(f"feature cache {features} does not exist (write one with --video on a long-video "
                                "model)")
    if subtitles is not None:
        load_subtitles(subtitles)


def count_frames(path, fps=1.0, max_frames=None) -> int:
    """How many frames iter_video will give, from the file's packets alone (nothing decoded): a video too long
    for the context can be refused before any decoding."""
    n = sum(1 for _ in _sampled(((None, t) for t in _packet_times(path)), fps))
    return n if max_frames is None else min(n, int(max_frames))
