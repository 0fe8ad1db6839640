"""An OpenAI-compatible HTTP server for LLaMA-VID (chat completions about an image or a video, streamed or not)
and one static chat page (serve.html). An adapter over chat.py: requests become chat.Chat conversations.

python serve.py --model-path DIR_OR_HUB_ID [--quantize int8|int4] [--host H --port P] [--media-dir D]"""
import argparse
import asyncio
import base64
import hashlib
import io
import ipaddress
import json
import math
import mimetypes
import re
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

import chat
from checkpoint import is_hub_id
from media import content_hash, count_frames, encode_frames, iter_video, load_image, movie_prompt, preprocess_images
from model import IMAGE_TOKEN, Media

try:  # the server's extras (pip install -r requirements-serve.txt); the model needs none of them
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    MISSING = None
except ImportError as e:
    MISSING = e.name

EVA_BATCH = 32        # frames per vision-tower call: an hour of video never goes through EVA at once
THUMBNAILS = 32       # at most this many frame previews per video (evenly spread) for the page
THUMBNAIL_SIZE = 160  # px, the longer side of a preview
MAX_STOPS = 4         # stop strings per request, OpenAI's limit
CLIENT_GONE = 499     # the status of a request whose client left before its answer (nobody receives it)
PAGE = Path(__file__).with_name("serve.html")


def parse_args(argv=None):
    p = chat.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_model_args(p)
    p.add_argument("--model-name", default=None, help="the id clients ask for (default: the model directory's "
                   "name, or a Hub id's repository name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--media-dir", type=Path, default=None,
                   help="allow local paths / file:// URLs, but only of files under this directory")
    p.add_argument("--allow-remote", action="store_true", help="allow http(s) media URLs (the server fetches them)")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest image / video a request may carry")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs) and the prefill; CUDA only")
    chat.add_media_args(p)
    p.add_argument("--max-new-tokens", type=int, default=512, help="max_tokens of a request that gives none")
    p.add_argument("--cache-mb", type=float, default=4096,
                   help="memory for the EVA features of recent images / videos (least recently used go first)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests that may wait for the model (each holds its upload); more get 503 with Retry-After")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated web origins (http://host:port) whose pages may call this server, besides "
                        "its own chat page; their host names are served too. '*' allows every page and host name")
    args = chat.check_args(p, p.parse_args(argv))
    if not args.max_upload_mb > 0:
        p.error(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.max_queue < 0:
        p.error(f"--max-queue must be 0 or more, got {args.max_queue}")
    args.allowed_origins = [o.strip().rstrip("/").lower() for o in args.allowed_origins.split(",") if o.strip()]
    for origin in args.allowed_origins:
        parts = urllib.parse.urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.hostname or parts.path):
            p.error(f"--allowed-origins: {origin!r} is not an origin; write it as http://host:port")
    if args.media_dir is not None and not args.media_dir.is_dir():
        p.error(f"--media-dir {args.media_dir} is not a directory")
    return args


# ----------------------------------------------------------------------------------------------------------
# errors: every failure a client can cause is one of these, answered in OpenAI's error shape

class APIError(Exception):
    def __init__(self, status, message, code=None, param=None, headers=None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.extra = status, message, code, param, extra
        self.headers = headers

    def body(self):
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code,
                          **self.extra}}


def too_large(size, limit, what="the request"):
    """413; limit is --max-upload-mb in bytes (a JSON body may be larger: it carries the file as base64)."""
    return APIError(413, f"{what} is {size / 2**20:.1f} MB but this server takes images and videos of up to "
                         f"{limit / 2**20:g} MB (--max-upload-mb)", code="request_too_large")


class Stopped(Exception):
    """The client went away: raised between frames to stop decoding and encoding its video."""


# ----------------------------------------------------------------------------------------------------------
# requests: validated into plain data before they queue for the GPU

@dataclass
class Source:
    """One image or video a request refers to: its bytes (uploads, remote URLs) or a path (under --media-dir)."""
    kind: str      # "image" | "video"
    sha256: str    # the cache key: the same file under any name or URL hits the same cache entry
    label: str     # how error messages name it
    data: Optional[bytes] = None
    path: Optional[Path] = None
    suffix: str = ""


@dataclass
class ChatRequest:
    turns: list                 # [("USER"|"ASSISTANT", text)], alternating, first and last USER; no placeholders
    source: Optional[Source]    # the conversation's one image / video, whichever user message carried it
    system: Optional[str]       # replaces the template's system sentence when given
    question: str               # the last user message: it guides the Q-Former (chat.Chat)
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: Optional[int]
    stream: bool
    include_usage: bool


DATA_URL_PREFIX = "data:"
NOT_MEDIA_OK = ("", "application/octet-stream", "binary/octet-stream")  # a type that says nothing: look inside


def media_kind(mime, label, data=None, path=None):
    """"image" or "video": from the declared type when it says, else from the content (Pillow reads it or not)."""
    family = mime.split("/")[0]
    if family in ("image", "video"):
        return family
    if mime not in NOT_MEDIA_OK:
        raise APIError(415, f"{label} is {mime}, not an image or a video", code="unsupported_media_type")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.verify()
        return "image"
    except Exception:  # anything Pillow cannot read goes to the video decoder, which says what is wrong with it
        return "video"


def read_data_url(url, limit, label):
    head, sep, payload = url[len(DATA_URL_PREFIX):].partition(",")
    if not sep:
        raise APIError(400, f"{label} is a malformed data: URL; expected data:<type>;base64,<data>", code="invalid_url")
    mime, *params = [s.strip().lower() for s in head.split(";")]
    if "base64" in params:
        if len(payload) * 3 // 4 > limit + 2:  # refuse before decoding
            raise too_large(len(payload) * 3 // 4, limit, label)
        payload = re.sub(r"\s+", "", urllib.parse.unquote(payload))  # line breaks some clients add; %-escapes
        try:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)  # padding may be left off
        except ValueError:  # binascii.Error, or a character outside ASCII
            raise APIError(400, f"{label} is not valid base64: a data: URL's base64 holds only A-Z, a-z, 0-9, + "
                                "and /", code="invalid_base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limit:
        raise too_large(len(data), limit, label)
    if not data:
        raise APIError(400, f"{label} is an empty data: URL", code="invalid_url")
    return mime, data


def fetch_remote(url, limit, label):
    request = urllib.request.Request(url, headers={"User-Agent": "llama-vid-serve"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            size = r.headers.get("Content-Length")
            if size and size.isdigit() and int(size) > limit:
                raise too_large(int(size), limit, label)
            data = r.read(limit + 1)
            mime = r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        raise APIError(400, f"could not fetch {label}: HTTP {e.code} {e.reason}", code="invalid_url") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(400, f"could not fetch {label}: {e}", code="invalid_url") from None
    if len(data) > limit:
        raise too_large(len(data), limit, label)
    return mime, data


def local_file(url, media_dir, label):
    """A path (or file:// URL) as a file under media_dir; anything resolving outside it (.., symlinks) is refused."""
    if media_dir is None:
        raise APIError(403, f"{label}: local files are not served; start the server with --media-dir DIR to allow "
                            "paths under DIR, or send the file as a data: URL", code="forbidden_path")
    raw = url
    if url.startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise APIError(403, f"{label}: file://{parsed.netloc}/ is not this machine", code="forbidden_path")
        raw = urllib.parse.unquote(parsed.path)
    root = media_dir.resolve()
    path = (root / raw).resolve()  # an absolute path replaces root; a relative one is taken under it
    if not path.is_relative_to(root):
        raise APIError(403, f"{label}: {raw} is outside the media directory (--media-dir)", code="forbidden_path")
    if not path.is_file():
        raise APIError(404, f"{label}: {raw} is not a file in the media directory", code="media_not_found")
    return path


def resolve_media(url, cfg, label):
    """A media URL (data:, http(s):, file:, or a path) -> Source, with its content hash. Runs off the event loop."""
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{label} has no url", code="invalid_url")
    limit = cfg["max_upload"]
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        mime, data = read_data_url(url, limit, label)
        path = None
    elif scheme in ("http", "https"):
        if not cfg["allow_remote"]:
            raise APIError(403, f"{label}: remote URLs are off; start the server with --allow-remote, or send the "
                                "file as a data: URL", code="forbidden_url")
        mime, data = fetch_remote(url, limit, label)
        path = None
    elif scheme in ("", "file") or len(scheme) == 1:  # a path (a one-letter "scheme" is a Windows drive)
        path = local_file(url, cfg["media_dir"], label)
        mime, data = (mimetypes.guess_type(path.name)[0] or "").lower(), None
    else:
        raise APIError(400, f"{label}: unsupported URL scheme {scheme!r}: use data:, http(s): or a file path",
                       code="invalid_url")
    return make_source(mime, label, data=data, path=path)


def make_source(mime, label, data=None, path=None, name=None):
    """name: what later errors call the file (the page sends the name the user picked)."""
    kind = media_kind(mime, name or label, data, path)
    digest = hashlib.sha256(data).hexdigest() if data is not None else content_hash(path)
    suffix = path.suffix if path is not None else (mimetypes.guess_extension(mime) or "")
    name = name or (f"the uploaded {kind}" if path is None else str(path.name))
    return Source(kind, digest, name, data=data, path=path, suffix=suffix)


def _number(req, key, default, lo, hi, integer=False):
    value = req.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{key} must be {kind} in [{lo}, {hi}], got {value!r}", code="invalid_value", param=key)
    return value


def _text(content, where):
    """The text of a message's content (a string or a list of parts), and its media parts (label, url)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param=where)
    texts, media = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            ref = part.get(kind)
            media.append((f"{where}.content[{j}]", ref.get("url") if isinstance(ref, dict) else ref))
        else:
            raise APIError(400, f"{where}.content[{j}] is not a text, image_url or video_url part",
                           param=f"{where}.content[{j}]")
    return "\n".join(texts), media


def parse_chat(body: bytes, cfg) -> ChatRequest:
    """The JSON body of POST /v1/chat/completions -> ChatRequest, or an APIError saying what is wrong."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:  # the parser recurses once per level of [ or {
        raise APIError(400, "the request body nests JSON arrays / objects too deeply; a chat request needs a few "
                            "levels", code="invalid_json") from None
    if not isinstance(req, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    model = req.get("model")
    if model is not None and model != cfg["model_name"]:
        raise APIError(404, f"the model {model!r} does not exist; this server has {cfg['model_name']!r}",
                       code="model_not_found", param="model")
    n = req.get("n")
    if n is not None and (type(n) is not int or n != 1):  # true == 1 and 1.0 == 1 in Python: check the type
        raise APIError(400, f"n must be the integer 1 (this server makes one answer per request), got "
                            f"{json.dumps(n)}", code="invalid_value", param="n")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    turns, turn_media, system = [], [], None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where}.role must be system, user or assistant, got {role!r}", param=where)
        text, media = _text(m.get("content"), where)
        if IMAGE_TOKEN in text:
            raise APIError(400, f"{where} contains {IMAGE_TOKEN!r}: attach images and videos as image_url / "
                                "video_url content parts instead", param=where)
        if role in ("system", "developer"):
            if media:
                raise APIError(400, f"{where}: only user messages may carry images or videos", param=where)
            system = text.strip() or None
            continue
        if role == "assistant" and media:
            raise APIError(400, f"{where}: only user messages may carry images or videos", param=where)
        text = text.strip()
        if not text and not media:
            raise APIError(400, f"{where} has no text", param=where)
        tag = "USER" if role == "user" else "ASSISTANT"
        if turns and turns[-1][0] == tag:  # the template alternates: two messages in a row become one
            turns[-1] = (tag, (turns[-1][1] + "\n" + text).strip())
            turn_media[-1] += media
        else:
            turns.append((tag, text))
            turn_media.append(media)
    if not turns or turns[0][0] != "USER" or turns[-1][0] != "USER":
        raise APIError(400, "the conversation must start and end with a user message", param="messages")
    if not all(text for _, text in turns[:-1]):  # the media moves to the last question, leaving no empty turn
        raise APIError(400, "every message before the last needs some text", param="messages")
    source = None
    for media in turn_media:
        for label, url in media:
            s = resolve_media(url, cfg, label)
            if source is None:
                source = s
            elif s.sha256 != source.sha256:
                raise APIError(400, f"{label} is a second image / video; LLaMA-VID takes one per conversation: "
                                    "start a new conversation to ask about another", param=label)
    stop = req.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOPS} strings", param="stop")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    options = req.get("stream_options") or {}
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", cfg["max_new_tokens"], 1, 2**31, integer=True)
    seed = _number(req, "seed", None, -2**63, 2**64 - 1, integer=True)
    # without temperature / top_p, the model's own defaults (chat.default_sampling), not OpenAI's 1.0
    temperature = float(_number(req, "temperature", cfg["temperature"], 0, 2))
    top_p = float(_number(req, "top_p", cfg["top_p"], 0, 1))
    try:
        chat.check_sampling(temperature, top_p)
    except ValueError as e:
        raise APIError(400, str(e), param="top_p" if "top_p" in str(e) else "temperature") from None
    return ChatRequest(turns=turns, source=source, system=system, question=turns[-1][1],
                       max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p,
                       stop=[s for s in stop if s], seed=seed, stream=stream,
                       include_usage=isinstance(options, dict) and bool(options.get("include_usage")))


# ----------------------------------------------------------------------------------------------------------
# the engine: everything that touches the model runs on its one worker thread, one request at a time

@dataclass
class CachedMedia(Media):
    """An image, video or movie as the model takes it (EVA features, cls first, for every kind) and what the page
    shows of it."""
    thumbnails: list = field(default_factory=list)  # JPEG data: URLs of up to THUMBNAILS frames
    nbytes: int = 0                                 # the features' size, what the cache's budget counts


def thumbnail(frame) -> str:
    image = Image.fromarray(np.asarray(frame)) if not isinstance(frame, Image.Image) else frame.copy()
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def spread(items, n):
    """At most n items, evenly spread, first and last included."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


class Job:
    """One request's place in the queue and what its work on the model thread tells the event loop, in order,
    through an asyncio queue: a chat's ("start", prompt_tokens), ("delta", text)..., ("done", {finish_reason,
    usage}); an upload's ("done", description); or ("error", APIError). A client that goes away cancels the job:
    ("cancelled", None), the work stops at its next frame or token (or never starts), and its place frees at once."""

    def __init__(self, loop, release):
        self.loop, self.events, self.cancelled, self.release_slot = loop, asyncio.Queue(), False, release
        self.work = None  # the parsed request; dropped on cancel, so an abandoned upload frees its memory

    def emit(self, kind, payload=None):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def release(self):  # on the event loop; once
        if self.release_slot is not None:
            self.release_slot()
            self.release_slot = None

    def cancel(self):  # on the event loop
        if not self.cancelled:
            self.cancelled, self.work = True, None
            self.events.put_nowait(("cancelled", None))
        self.release()

    def check(self):
        if self.cancelled:
            raise Stopped()


class Engine:
    def __init__(self, model, tokenizer, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.device = model.llm.tok_embeddings.weight.device
        self.context = model.llm.cfg.context_length
        self.long_video = model.is_long_video
        self.cache, self.cache_bytes, self.cache_limit = OrderedDict(), 0, int(args.cache_mb * 2**20)

    def kind(self, src: Source) -> str:
        """What the model makes of a file: the long-video model takes every video as a movie."""
        return "movie" if src.kind == "video" and self.long_video else src.kind

    # media --------------------------------------------------------------------------------------------------

    def media(self, src: Source, check=None) -> CachedMedia:
        """The EVA features of an image / video, from the cache or decoded and encoded now. check(frames) runs
        before decoding (with the frame count the sampling will keep, read from the packets) and again before each
        frame goes on to EVA, so a video too long for the context, or one nobody waits for any more, costs
        neither decoder nor vision-tower time."""
        key = (src.sha256, src.kind)
        if key in self.cache:
            self.cache.move_to_end(key)
            media = self.cache[key]
            if check is not None:
                check(media.frames)
            return media
        tmp = None
        path = src.path
        if path is None:  # the decoders read files: give the bytes one for as long as it takes
            tmp = tempfile.NamedTemporaryFile(suffix=src.suffix, delete=False)
            tmp.write(src.data)
            tmp.close()
            path = Path(tmp.name)
        try:
            media = self._encode(src, path, check)
        except (ValueError, OSError) as e:  # media.py's messages say what is wrong with the file, naming it
            message = re.sub(r"\[Errno -?\d+\] ", "", str(e)).replace(f": '{path}'", "")  # FFmpeg's, naming it again
            raise APIError(415, message.replace(str(path), src.label), code="unsupported_media_type") from None
        finally:
            if tmp is not None:
                Path(tmp.name).unlink(missing_ok=True)
        if media.nbytes <= self.cache_limit:  # one larger than the whole budget is used once, never kept
            self.cache[key] = media
            self.cache_bytes += media.nbytes
            while self.cache_bytes > self.cache_limit:
                _, old = self.cache.popitem(last=False)
                self.cache_bytes -= old.nbytes
        return media

    def _encode(self, src: Source, path, check) -> CachedMedia:
        if src.kind == "image":
            try:
                image = load_image(path)
            except Image.DecompressionBombError as e:  # not an OSError: Pillow refuses an image this large
                raise ValueError(str(e)) from None
            if check is not None:
                check(1)
            features = self.model.encode(preprocess_images([image], self.model.image_size, self.model.pads_images))
            return CachedMedia("image", features=features, times=[0.0], thumbnails=[thumbnail(image)],
                               nbytes=features.numel() * features.element_size())
        if check is not None:
            check(count_frames(path, self.args.fps, self.args.max_frames))
        thumbs = []

        def previewed(frames):  # runs on encode_frames' decoding thread, which hands its exceptions on
            for frame, t in frames:
                if check is not None:
                    check(len(thumbs) + 1)
                thumbs.append(thumbnail(frame))
                yield frame, t
        kind = self.kind(src)
        # an hour of a movie's features waits on the CPU in float16; a short video's stay on the device
        features, times = encode_frames(self.model, previewed(iter_video(path, self.args.fps, self.args.max_frames)),
                                        EVA_BATCH, keep_on_device=kind != "movie", progress=False)
        text = movie_prompt([], times, self.model.video_token) if kind == "movie" else None
        return CachedMedia(kind, features=features, times=times, text=text, thumbnails=spread(thumbs, THUMBNAILS),
                           nbytes=features.numel() * features.element_size())

    def visual_tokens(self, media):
        return 0 if media is None else media.frames * self.model.frame_tokens(media.kind)

    # prompts ------------------------------------------------------------------------------------------------

    def conversation(self, turns, system, kind=None) -> chat.Chat:
        """The chat of a request whose last turn is the question about to be asked. Until its media are encoded,
        a one-frame stand-in of their kind holds their place (a movie's prompt, without subtitles here, does not
        depend on the frames' times)."""
        stand_in = None
        if kind is not None:
            text = movie_prompt([], [0.0], self.model.video_token) if kind == "movie" else None
            stand_in = Media(kind, features=torch.empty(1, 0, 0), text=text)
        return chat.Chat(self.model, self.tokenizer, stand_in, messages=turns[:-1], system=system,
                         compile=self.args.compile)

    def planned_length(self, conv: chat.Chat, question):
        """The prompt's length as a function of its media's frame count, known before any frame is decoded: each
        frame adds the same number of tokens (a movie's placeholders included)."""
        one = conv.prompt_length(conv.prompt_ids(question))  # with the one-frame stand-in
        per_frame = self.model.frame_tokens(conv.media.kind)
        return lambda frames: one + (frames - 1) * per_frame

    def check_context(self, conv: chat.Chat, n, frames=None):
        """chat.Chat's context check, answered as a 400 that carries the counts."""
        try:
            conv.check_context(n, frames)
        except ValueError as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages", prompt_tokens=n,
                           context_length=self.context) from None

    # requests -----------------------------------------------------------------------------------------------

    def describe(self, src: Source, job=None) -> dict:
        """POST /v1/media: decode and encode now (the cache keeps the features), say what the model will see.
        A video that leaves no room for a question is refused here, before decoding, as a chat would refuse it."""
        kind = self.kind(src)
        length = self.planned_length(self.conversation([("USER", "")], None, kind), "")  # the shortest prompt
        per_frame = self.model.frame_tokens(kind)

        def check(frames):
            if job is not None:
                job.check()
            n = length(frames)
            if n >= self.context:
                fit = (self.context - 1 - length(0)) // per_frame
                raise APIError(400, f"{src.label} is too long for the model: its {frames} frames need {n} prompt "
                                    f"tokens and the context holds {self.context}; trim the video, or start the "
                                    f"server with --max-frames {fit} or a lower --fps",
                               code="context_length_exceeded", prompt_tokens=n, context_length=self.context)
        with torch.no_grad():
            media = self.media(src, check)
        return {"id": "sha256:" + src.sha256, "object": "media", "kind": src.kind, "frames": media.frames,
                "times": [round(t, 3) for t in media.times], "thumbnails": media.thumbnails,
                "visual_tokens": self.visual_tokens(media), "context_length": self.context}

    def complete(self, req: ChatRequest, job: Job):
        started = time.perf_counter()
        with torch.no_grad():  # grad mode is per thread: this worker's must be off too
            conv = self.conversation(req.turns, req.system, self.kind(req.source) if req.source else None)
            if req.source is not None:
                length = self.planned_length(conv, req.question)

                def check(frames):
                    job.check()  # the client left: stop decoding
                    self.check_context(conv, length(frames), frames)
                conv.media = self.media(req.source, check)
            n = conv.prompt_length(conv.prompt_ids(req.question))
            self.check_context(conv, n)
            job.emit("start", n)
            generator = None
            if req.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(req.seed % 2**64)
            # the answer may use what is left of the context, no more
            conv.ask(req.question, min(req.max_tokens, self.context - n), req.temperature, req.top_p,
                     on_text=lambda text: job.emit("delta", text), stop=req.stop, generator=generator,
                     cancelled=lambda: job.cancelled)
        reply = conv.reply
        usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                 "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        job.emit("done", {"finish_reason": reply.finish_reason, "usage": usage})
        print(f"chat: {n} prompt tokens ({self.visual_tokens(conv.media)} visual), {reply.completion_tokens} new, "
              f"{reply.finish_reason}, {time.perf_counter() - started:.2f} s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# the HTTP side

def foreign_request(host, origin, hosts, origins):
    """Why a request must be refused as coming from another web site, or None. A browser lets any page POST to
    this server (a form or a no-cors fetch with a text/plain body needs no permission) and names that page in
    Origin; a page on a site whose DNS name was re-pointed at this machine (DNS rebinding) is even same-origin,
    but its Host header carries that name. So: the Host must be an address, localhost, the name the server
    listens on or one allowed, and an Origin (clients outside a browser send none) must be this server itself
    or an allowed one."""
    if "*" in origins:
        return None
    if host is not None:
        try:
            name = urllib.parse.urlsplit("//" + host).hostname or ""
        except ValueError:
            name = ""
        try:
            ipaddress.ip_address(name)  # an address cannot be re-pointed
            known = True
        except ValueError:
            known = name == "localhost" or name.endswith(".localhost") or name in hosts
        if not known:
            return APIError(403, f"this server does not serve the host name {host!r}; to serve under it, start it "
                                 f"with --allowed-origins http://{host}", code="forbidden_host")
    if origin is not None:
        parts = urllib.parse.urlsplit(origin.lower())
        if origin.lower() not in origins and (host is None or parts.netloc != host.lower()):
            return APIError(403, f"requests from the web page at {origin} are refused; to let that site use this "
                                 f"server, start it with --allowed-origins {origin}", code="forbidden_origin")
    return None


class SameSite:
    """ASGI middleware: refuses (403) what foreign_request refuses, before any work."""

    def __init__(self, app, hosts, origins):
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            error = foreign_request(headers.get("host"), headers.get("origin"), self.hosts, self.origins)
            if error is not None:
                return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(engine: Engine, cfg: dict):
    app = FastAPI(title="LLaMA-VID", docs_url=None, redoc_url=None, openapi_url=None)
    origins = cfg["allowed_origins"]
    if origins:  # their pages' fetches need CORS answers (a JSON POST is preflighted)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After"])
    app.add_middleware(SameSite, hosts=cfg["allowed_hosts"], origins=origins)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # FIFO: requests wait their turn
    created = int(time.time())
    state = {"pending": 0, "job_s": 1.0}  # requests admitted and not finished; recent seconds per job
    limit = cfg["max_upload"]
    json_limit = limit * 4 // 3 + 2**20  # a data: URL is base64 (4/3 of the file) inside the JSON
    page_html = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse(APIError(500, f"internal error: {e}").body(), status_code=500)

    async def read_body(request: Request, allowed):
        """The body, refused (413) as soon as its Content-Length or what has come of it is over `allowed` bytes."""
        size = request.headers.get("content-length")
        if size is not None:
            if not size.isdigit():
                raise APIError(400, f"Content-Length {size!r} is not a number")
            if int(size) > allowed:
                raise too_large(int(size), limit)
        chunks, n = [], 0
        async for chunk in request.stream():  # a body without Content-Length is counted as it comes
            n += len(chunk)
            if n > allowed:
                raise too_large(n, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def admit():
        """A place in the queue for a request, before its body is read (a waiting request holds its upload):
        one runs and up to --max-queue wait; past that, 503 and when to come back."""
        if state["pending"] > cfg["max_queue"]:
            wait = max(1, math.ceil(state["job_s"]))  # about when the running job frees a place
            raise APIError(503, f"the server is busy: {state['pending']} requests are running or waiting "
                                f"(--max-queue {cfg['max_queue']}); try again in {wait} s", code="server_busy",
                           headers={"Retry-After": str(wait)})
        state["pending"] += 1
        return Job(asyncio.get_running_loop(), lambda: state.__setitem__("pending", state["pending"] - 1))

    async def watch(request: Request, job: Job):
        """Cancel the job when its client disconnects (the body is read: what comes next is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    def run(job: Job, fn, what):
        """On the model thread: fn(work, job), unless the client left while the job waited."""
        work = job.work
        if job.cancelled or work is None:
            return
        started = time.perf_counter()
        try:
            fn(work, job)
        except Stopped:  # the client left mid-work
            pass
        except APIError as e:
            job.emit("error", e)
        except Exception as e:  # the server keeps serving; the client hears what went wrong
            traceback.print_exception(e, file=sys.stderr)
            job.emit("error", APIError(500, f"{what} failed: {e}"))
        state["job_s"] = 0.7 * state["job_s"] + 0.3 * (time.perf_counter() - started)

    async def start(request: Request, job: Job, fn, what):
        """Queue the job for the model thread and watch its client; returns its first event and the watcher."""
        future = asyncio.get_running_loop().run_in_executor(worker, run, job, fn, what)
        future.add_done_callback(lambda _: job.release())
        watcher = asyncio.create_task(watch(request, job))
        try:
            return await job.events.get(), watcher
        except BaseException:
            watcher.cancel()
            raise

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg["model_name"], "queued": state["pending"],
                "max_queue": cfg["max_queue"], "max_upload_mb": cfg["max_upload_mb"],
                "context_length": engine.context, "cached_media": len(engine.cache)}

    def model_card():
        return {"id": cfg["model_name"], "object": "model", "created": created, "owned_by": "llama-vid"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != cfg["model_name"]:
            raise APIError(404, f"the model {name!r} does not exist; this server has {cfg['model_name']!r}",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/media")
    async def media(request: Request, name: str = ""):
        """The page's upload: the raw file as the body (?name= the file's name, for messages). Returns the
        frames the model will see (previews) and warms the feature cache, so the first question about it does
        not wait for the vision tower."""
        job = admit()
        try:
            body = await read_body(request, limit)
            if not body:
                raise APIError(400, "the upload is empty")
            mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
            name = "".join(c for c in name if c.isprintable())[:120] or None
            job.work = await asyncio.to_thread(make_source, mime, "the uploaded file", body, None, name)
            del body
        except BaseException:
            job.release()
            raise
        (kind, payload), watcher = await start(request, job, lambda src, job: job.emit(
            "done", engine.describe(src, job)), "reading the file")
        watcher.cancel()
        if kind == "error":
            raise payload
        if kind == "cancelled":
            return Response(status_code=CLIENT_GONE)
        return payload

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        job = admit()
        try:
            body = await read_body(request, json_limit)
            req = await asyncio.to_thread(parse_chat, body, cfg)  # base64 of a 50 MB video: not on the event loop
            del body
        except BaseException:
            job.release()
            raise
        stream, include_usage, job.work = req.stream, req.include_usage, req
        del req  # the job holds it, until it runs or is cancelled
        (kind, payload), watcher = await start(request, job, engine.complete, "generation")
        cid, stamp, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), cfg["model_name"]
        if not stream:
            try:
                text = []
                while kind != "done":
                    if kind == "error":
                        raise payload
                    if kind == "cancelled":
                        return Response(status_code=CLIENT_GONE)
                    if kind == "delta":
                        text.append(payload)
                    kind, payload = await job.events.get()
            finally:
                watcher.cancel()
            return {"id": cid, "object": "chat.completion", "created": stamp, "model": name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "logprobs": None, "finish_reason": payload["finish_reason"]}],
                    "usage": payload["usage"]}
        watcher.cancel()  # from here the streaming response notices a disconnect (and closes events())
        if kind == "error":
            raise payload
        if kind == "cancelled":
            return Response(status_code=CLIENT_GONE)

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": stamp, "model": name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def sse(obj):
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield sse(chunk({"role": "assistant", "content": ""}))
                while True:
                    kind, payload = await job.events.get()
                    if kind == "delta":
                        yield sse(chunk({"content": payload}))
                    elif kind == "error":
                        yield sse(payload.body())
                        break
                    elif kind == "done":
                        yield sse(chunk({}, payload["finish_reason"]))
                        if include_usage:
                            yield sse({**chunk({}), "choices": [], "usage": payload["usage"]})
                        break
                    elif kind == "cancelled":
                        return
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a client that went away stops its generation at the next token
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def served_name(model_path) -> str:
    """The id clients ask for: a Hub id's repository name, or the model directory's name."""
    if is_hub_id(model_path):
        return str(model_path).rsplit("/", 1)[-1]
    return Path(model_path).resolve().name


def make_cfg(args, model_path, long_video):
    """What build_app needs from the command line."""
    hosts = {args.host.lower()} | {urllib.parse.urlsplit(o).hostname for o in args.allowed_origins if o != "*"}
    temperature, top_p = chat.default_sampling(long_video)
    return {"model_name": args.model_name or served_name(model_path),
            "max_upload": int(args.max_upload_mb * 2**20), "max_upload_mb": args.max_upload_mb,
            "media_dir": args.media_dir, "allow_remote": args.allow_remote, "max_new_tokens": args.max_new_tokens,
            "max_queue": args.max_queue, "allowed_origins": args.allowed_origins, "allowed_hosts": hosts,
            "temperature": temperature, "top_p": top_p}


def main(argv=None):
    args = parse_args(argv)
    if MISSING:  # said before minutes of loading a model
        sys.exit(f"error: serve.py needs {MISSING}, which is not installed: pip install -r requirements-serve.txt")
    model, tokenizer, _ = chat.load_model_from_args(args)
    engine = Engine(model, tokenizer, args)
    # a LoRA run is served under its own name, not its base's
    cfg = make_cfg(args, args.lora or args.model_path or chat.DEFAULT_MODEL, model.is_long_video)
    app = build_app(engine, cfg)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the model"
              + (" and make it fetch URLs" if args.allow_remote else ""), file=sys.stderr)
    print(f"serving {cfg['model_name']} on http://{args.host}:{args.port}/ (chat page at /)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=30)
    return 0


if __name__ == "__main__":
    chat.run_command(main)
