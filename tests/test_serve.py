"""serve.py: the official openai client gets what sample.py prints (greedy, streamed or not, multi-turn), bad requests
get OpenAI-shaped 4xx errors while the server keeps serving, abandoned and excess requests cost no model time, other
web sites cannot drive it, and a headless Chromium chats on its page at a desktop and a phone size."""
import base64
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media import write_video  # noqa: E402

QUESTION = "What is moving in the video?"
FOLLOW_UP = "Which way does the red square go?"
IMAGE_QUESTION = "Describe the image."
NEW = 8
FRAMES = 3  # the clip: 6 frames at 2 fps, sampled at 1 fps -> t = 0, 1, 2 s
CPU = ["--device", "cpu", "--dtype", "float32"]
GREEDY = ["--temperature", "0", "--max-new-tokens", str(NEW), "--debug"]
UPLOAD_MB = 1  # the server's --max-upload-mb here, so that an upload over it stays small
LONG_FRAMES = 2100  # a 1 fps video of this many frames needs 2 x 2100 visual tokens: over the tiny model's 4096
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_py(*args, stdin=None):
    """sample.py started as a user runs it (it runs while the server loads)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.Popen([sys.executable, "sample.py", *map(str, args)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE), stdin


def finish(proc_and_stdin):
    proc, stdin = proc_and_stdin
    out, err = proc.communicate(stdin.encode() if stdin else None, timeout=120)
    out, err = out.decode("utf-8"), err.decode("utf-8")
    assert proc.returncode == 0, err
    counts = [int(n) for n in re.findall(r"\[prompt, (\d+) tokens\]", err)]  # what sample.py --debug counts
    return out, counts


@pytest.fixture(scope="module")
def world(fixtures, tmp_path_factory):
    """The server on a free port, and sample.py's answers to compare with (both started at once: 2 cores)."""
    ckpt = fixtures / "video"
    folder = tmp_path_factory.mktemp("serve")
    frames = np.full((6, 48, 64, 3), 30, np.uint8)  # two shapes moving in opposite directions, 2 fps
    for t in range(6):
        frames[t, 8:20, 4 + 8 * t:16 + 8 * t] = (230, 40, 40)
        frames[t, 28:40, 48 - 6 * t:60 - 6 * t] = (40, 200, 60)
    clip, png = folder / "clip.mp4", fixtures / "cases" / "image.png"
    write_video(clip, frames, fps=2)
    allowed = folder / "allowed"  # the server's --media-dir
    allowed.mkdir()
    shutil.copy(clip, allowed / "clip.mp4")

    port = free_port()
    log = open(folder / "server.log", "w+")
    server = subprocess.Popen([sys.executable, "serve.py", "--model-path", str(ckpt), "--port", str(port), *CPU,
                               "--media-dir", str(allowed), "--max-upload-mb", str(UPLOAD_MB)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    runs = [sample_py("--model-path", ckpt, "--video", clip, "--question", QUESTION, *CPU, *GREEDY),
            sample_py("--model-path", ckpt, "--video", clip, *CPU, *GREEDY, stdin=f"{QUESTION}\n{FOLLOW_UP}\n"),
            sample_py("--model-path", ckpt, "--image", png, "--question", IMAGE_QUESTION, *CPU, *GREEDY)]
    try:
        (answer, (n_prompt,)), (chat_out, chat_counts), (image_out, (n_image,)) = [finish(r) for r in runs]
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"serve.py did not come up:\n{log.read()}")
            time.sleep(0.2)
        # interactive sample.py: "USER: ASSISTANT: <answer>\n" per question
        chat = re.findall(r"ASSISTANT: (.*?)\nUSER: ", chat_out, re.S)
        assert len(chat) == 2 and len(chat_counts) == 2, chat_out
        yield SimpleNamespace(url=url, port=port, ckpt=ckpt, clip=clip, png=png, folder=folder,
                              answer=answer[:-1], n_prompt=n_prompt,  # sample.py ends the answer with "\n"
                              chat=chat, chat_counts=chat_counts, image_answer=image_out[:-1], n_image=n_image)
    finally:
        for proc, _ in runs:  # left running only when another one failed
            if proc.poll() is None:
                proc.kill()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def data_url(path, mime):
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """35 minutes at 1 fps of 16x16 frames: 60 KB to send, too long for the model's context."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    frames = np.zeros((LONG_FRAMES, 16, 16, 3), np.uint8)
    frames[:] = (np.arange(LONG_FRAMES) % 200)[:, None, None, None]
    write_video(path, frames, fps=1)
    return path


def video_part(url):
    return {"type": "video_url", "video_url": {"url": url}}


def ask(media_part, question):
    return {"role": "user", "content": [media_part, {"type": "text", "text": question}]}


@pytest.fixture(scope="module")
def client(world):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=world.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(client, messages, **kw):
    return client.chat.completions.create(model="video", messages=messages, temperature=0, max_tokens=NEW, **kw)


def streamed(client, messages, **kw):
    """(text, content chunks, finish_reason, usage) of a streamed completion."""
    text, n, finish, usage = "", 0, None, None
    for chunk in greedy(client, messages, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text, n = text + choice.delta.content, n + 1
            finish = choice.finish_reason or finish
    return text, n, finish, usage


def post(world, path, body: bytes, content_type="application/json"):
    """(status, json) of a raw POST."""
    req = urllib.request.Request(world.url + path, body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def fetch(world, path, body=None, **headers):
    """(status, json, headers) of a request with the headers given (Host included: urllib then sends that one)."""
    req = urllib.request.Request(world.url + path, body, {k.replace("_", "-"): v for k, v in headers.items()})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def wait_for(condition, what, timeout=60):
    """Poll a condition the server reports (a counter), failing after timeout (which only a failure reaches)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def chat_request(world, messages, **kw):
    return post(world, "/v1/chat/completions",
                json.dumps({"model": "video", "messages": messages, "max_tokens": NEW, **kw}).encode())


def assert_error(status_body, status, *words):
    got, body = status_body
    assert got == status, body
    err = body["error"]  # OpenAI's shape
    assert isinstance(err["message"], str) and err["type"] and "code" in err and "param" in err
    for w in words:
        assert w in err["message"], err["message"]
    return err


def health(world):
    with urllib.request.urlopen(world.url + "/health", timeout=10) as r:
        assert r.status == 200
        return json.loads(r.read())


# ----------------------------------------------------------------------------------------------------------
# the answers are sample.py's

def test_models_and_health(world, client):
    assert [m.id for m in client.models.list().data] == ["video"]
    h = health(world)
    assert h["status"] == "ok" and h["model"] == "video"


def test_greedy_matches_sample(world, client):
    r = greedy(client, [ask(video_part(data_url(world.clip, "video/mp4")), QUESTION)])
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == world.answer
    assert r.usage.prompt_tokens == world.n_prompt  # text + visual tokens, as sample.py counts them
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == NEW
    else:
        assert choice.finish_reason == "stop" and r.usage.completion_tokens < NEW


def test_streaming_matches_sample(world, client):
    text, chunks, finish, usage = streamed(client, [ask(video_part(data_url(world.clip, "video/mp4")), QUESTION)])
    assert text == world.answer
    assert chunks >= 2 and finish in ("stop", "length")
    assert usage.prompt_tokens == world.n_prompt and usage.completion_tokens <= NEW


def test_multi_turn_matches_sample_chat(world, client):
    """The image goes in the first message; the follow-up is answered as sample.py's chat answers it (the media
    with the latest question, which guides the visual tokens)."""
    first = ask(video_part(data_url(world.clip, "video/mp4")), QUESTION)
    r = greedy(client, [first])
    assert r.choices[0].message.content.strip() == world.chat[0].strip()
    history = [first, {"role": "assistant", "content": r.choices[0].message.content},
               {"role": "user", "content": FOLLOW_UP}]
    text, _, _, usage = streamed(client, history)
    assert text == world.chat[1]
    assert usage.prompt_tokens == world.chat_counts[1]


def test_image_and_media_dir_path(world, client):
    r = client.chat.completions.create(model="video", temperature=0, max_tokens=NEW, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(world.png, "image/png")}},
                                     {"type": "text", "text": IMAGE_QUESTION}]}])
    assert r.choices[0].message.content == world.image_answer and r.usage.prompt_tokens == world.n_image
    # a file under --media-dir, by relative path and by file:// URL
    for url in ("clip.mp4", (world.folder / "allowed" / "clip.mp4").as_uri()):
        r = greedy(client, [ask(video_part(url), QUESTION)])
        assert r.choices[0].message.content == world.answer


def test_stop_strings_and_seed(world, client):
    answer = world.answer
    k = next((i for i in range(1, len(answer) - 2)
              if answer.find(answer[i:i + 2]) == i and "\ufffd" not in answer[i:i + 2]), None)
    if k is None:
        pytest.skip(f"the greedy answer {answer!r} has no usable stop string")
    messages = [ask(video_part(data_url(world.clip, "video/mp4")), QUESTION)]
    r = greedy(client, messages, stop=[answer[k:k + 2], "never appears"])
    assert r.choices[0].message.content == answer[:k] and r.choices[0].finish_reason == "stop"
    text, _, finish, usage = streamed(client, messages, stop=answer[k:k + 2])
    assert text == answer[:k] and finish == "stop" and usage.completion_tokens <= NEW
    sampled = [client.chat.completions.create(model="video", messages=messages, temperature=1.0, top_p=1.0, seed=7,
                                              max_tokens=NEW).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_requests_queue_and_health_stays_up(world):
    """Four requests at once are answered one after another, each as if alone; /health answers meanwhile."""
    messages = [ask(video_part(data_url(world.clip, "video/mp4")), QUESTION)]
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(chat_request, world, messages, temperature=0) for _ in range(4)]
        assert health(world)["status"] == "ok"
        for f in answers:
            status, body = f.result()
            assert status == 200 and body["choices"][0]["message"]["content"] == world.answer


def test_twenty_concurrent_streams_complete_intact(world, client):
    """20 streaming clients at once: each gets the whole greedy answer, in order, as if it were alone."""
    messages = [ask(video_part(data_url(world.clip, "video/mp4")), QUESTION)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: streamed(client, messages), range(20)))
    for text, n, finish, usage in results:
        assert text == world.answer and finish in ("stop", "length") and usage.completion_tokens >= 1


def test_media_upload_previews_frames(world):
    status, body = post(world, "/v1/media", world.clip.read_bytes(), "video/mp4")
    assert status == 200 and body["kind"] == "video" and body["frames"] == FRAMES
    assert len(body["thumbnails"]) == FRAMES and all(t.startswith("data:image/jpeg;base64,")
                                                     for t in body["thumbnails"])
    assert body["times"] == pytest.approx([0.0, 1.0, 2.0])


# ----------------------------------------------------------------------------------------------------------
# bad requests: 4xx in OpenAI's shape, and the server goes on

def raw_post(world, path, head_only_length):
    """Claim a body of head_only_length bytes in Content-Length but send none: the server must refuse from the
    header alone. Returns (status, json)."""
    with socket.create_connection(("127.0.0.1", world.port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {head_only_length}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        while len(body) < length:
            body += s.recv(65536)
    return int(head.split()[1]), json.loads(body)


def test_bad_requests(world, client):
    import openai
    clip = video_part(data_url(world.clip, "video/mp4"))
    assert_error(post(world, "/v1/chat/completions", b'{"model": "video", "messages": ['), 400, "JSON")
    err = assert_error(post(world, "/v1/chat/completions",
                            json.dumps({"model": "gpt-4o", "messages": [ask(clip, QUESTION)]}).encode()), 404)
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])

    # over --max-upload-mb: by the Content-Length header alone, and by the decoded size of a data: URL
    assert_error(raw_post(world, "/v1/chat/completions", 100 * UPLOAD_MB * 2**20), 413)
    assert_error(raw_post(world, "/v1/media", UPLOAD_MB * 2**20 + 1), 413)
    big = f"data:video/mp4;base64,{base64.b64encode(os.urandom(UPLOAD_MB * 2**20 + 1000)).decode()}"
    assert_error(chat_request(world, [ask(video_part(big), QUESTION)]), 413, "--max-upload-mb")

    # not an image or a video
    junk = "data:video/mp4;base64," + base64.b64encode(b"this is not a video at all" * 40).decode()
    assert_error(chat_request(world, [ask(video_part(junk), QUESTION)]), 415)
    text = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    assert_error(chat_request(world, [ask(video_part(text), QUESTION)]), 415, "not an image or a video")
    assert_error(post(world, "/v1/media", b"hello", "text/plain"), 415)

    # paths outside --media-dir, and remote URLs without --allow-remote
    for url in ("../clip.mp4", str(world.clip), "file:///etc/passwd", "/etc/hostname"):
        assert_error(chat_request(world, [ask(video_part(url), QUESTION)]), 403)
    assert_error(chat_request(world, [ask(video_part("missing.mp4"), QUESTION)]), 404)
    assert_error(chat_request(world, [ask(video_part(world.url + "/clip.mp4"), QUESTION)]), 403, "--allow-remote")

    # a prompt over the context: 400 with the counts
    config = json.loads((world.ckpt / "config.json").read_text())
    context = int(config["max_position_embeddings"] * ((config.get("rope_scaling") or {}).get("factor", 1)))
    err = assert_error(chat_request(world, [ask(clip, "why " * context)]), 400, str(context))
    assert err["code"] == "context_length_exceeded" and err["prompt_tokens"] > context
    assert str(err["prompt_tokens"]) in err["message"]

    # malformed conversations and parameters
    other = video_part(data_url(world.png, "image/png"))
    assert_error(chat_request(world, [ask(clip, QUESTION), {"role": "assistant", "content": "a"},
                                      ask(other, FOLLOW_UP)]), 400, "one per conversation")
    assert_error(chat_request(world, [ask(clip, QUESTION), {"role": "assistant", "content": "a"}]), 400)
    assert_error(chat_request(world, [ask(clip, QUESTION)], temperature="hot"), 400, "temperature")
    assert_error(chat_request(world, []), 400, "messages")
    assert_error(post(world, "/v1/nothing", b"{}"), 404)

    # still serving, and still right
    assert health(world)["status"] == "ok"
    assert greedy(client, [ask(clip, QUESTION)]).choices[0].message.content == world.answer


def test_malformed_bodies_get_their_own_400(world, client):
    """JSON nested 100,000 deep, n: true and a data: URL whose base64 is not base64 each get a 400 that names
    the problem (they gave a 500, an answer, and "empty data: URL"); base64 with line breaks still works."""
    deep = b'{"model": "video", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = assert_error(post(world, "/v1/chat/completions", deep), 400, "too deeply")
    assert err["code"] == "invalid_json"
    hi = [{"role": "user", "content": "hi"}]
    for n in (True, 1.0, 2):
        assert_error(chat_request(world, hi, n=n), 400, "n must be the integer 1")
    assert chat_request(world, hi, n=1)[0] == 200
    assert_error(chat_request(world, hi, top_p=0), 400, "top_p must be in (0, 1]")  # (was a 500 from generate)
    # all junk (it decoded to nothing: "empty"); junk after good bytes (decoded to 3 zero bytes); one character
    # too many; a character outside ASCII
    for payload in ("!!!!", "!!!!not-base64!!!!", "AAAA$$$$", "A", "AAAA\u00e9"):
        err = assert_error(chat_request(world, [ask(video_part("data:video/mp4;base64," + payload), QUESTION)]),
                           400, "not valid base64")
        assert "empty" not in err["message"]
    clip = base64.b64encode(world.clip.read_bytes()).decode()
    wrapped = "\n".join(clip[i:i + 76] for i in range(0, len(clip), 76))  # as MIME encoders write it
    status, body = chat_request(world, [ask(video_part("data:video/mp4;base64," + wrapped), QUESTION)],
                                temperature=0)
    assert status == 200 and body["choices"][0]["message"]["content"] == world.answer


def test_other_web_sites_are_refused(world, client):
    """A page on another site can make the browser POST here (a form or a no-cors fetch: text/plain body, its
    own Origin), and a site whose DNS name now points here (rebinding) sends its own Host: both are refused
    before any work. The served page (Origin = this server) and clients without Origin go on working."""
    hi = json.dumps({"model": "video", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    here = f"127.0.0.1:{world.port}"
    status, body, _ = fetch(world, "/v1/chat/completions", hi, Content_Type="text/plain",
                            Origin="http://evil.example", Host=here)
    assert status == 403 and body["error"]["code"] == "forbidden_origin", body
    assert "--allowed-origins http://evil.example" in body["error"]["message"]
    status, body, _ = fetch(world, "/v1/chat/completions", hi, Content_Type="text/plain",
                            Origin=f"http://evil.example:{world.port}", Host=f"evil.example:{world.port}")
    assert status == 403 and body["error"]["code"] == "forbidden_host", body
    assert fetch(world, "/v1/media", world.clip.read_bytes(), Content_Type="video/mp4",
                 Origin="null", Host=here)[0] == 403  # a sandboxed frame or a file:// page
    assert fetch(world, "/v1/models", Host=f"evil.example:{world.port}")[0] == 403
    # the page as served, under its address or localhost; clients that send no Origin
    for host in (here, f"localhost:{world.port}"):
        status, body, _ = fetch(world, "/v1/chat/completions", hi, Content_Type="application/json",
                                Origin=f"http://{host}", Host=host)
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant", body
    assert fetch(world, "/v1/chat/completions", hi, Content_Type="application/json")[0] == 200
    assert greedy(client, [{"role": "user", "content": "hi"}]).choices[0].message.role == "assistant"


def test_media_upload_refuses_a_video_too_long_for_the_context(world, long_clip):
    """The upload applies the chat's limits: a 35-minute video (4,200 visual tokens for a 4,096 context) is
    refused at once with the --max-frames that would fit, and nothing of it is cached."""
    cached = health(world)["cached_media"]
    err = assert_error(post(world, "/v1/media?name=long.mp4", long_clip.read_bytes(), "video/mp4"), 400,
                       "long.mp4 is too long", "--max-frames")
    assert err["code"] == "context_length_exceeded" and err["prompt_tokens"] > err["context_length"]
    fit = int(re.search(r"--max-frames (\d+)", err["message"]).group(1))
    assert 0 < fit < LONG_FRAMES and err["prompt_tokens"] - 2 * (LONG_FRAMES - fit) < err["context_length"]
    assert health(world)["cached_media"] == cached
    assert_error(chat_request(world, [ask(video_part(data_url(long_clip, "video/mp4")), QUESTION)]), 400,
                 str(err["context_length"]))


# ----------------------------------------------------------------------------------------------------------
# the engine in this process: what work a request costs, watched through counters and events

TOKEN = 100  # a token id of the tiny vocabulary that is not EOS


@pytest.fixture(scope="module")
def engine(fixtures):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import chat
    import serve
    args = serve.parse_args(["--model-path", str(fixtures / "video"), *CPU])
    model, tokenizer, _ = chat.load_model_from_args(args)
    return serve.Engine(model, tokenizer, args)


@contextmanager
def served(engine, *flags):
    """The engine behind a uvicorn server in a thread of this process, with serve.py's flags."""
    import serve
    import uvicorn
    args = serve.parse_args(["--model-path", str(engine.args.model_path), *CPU, *flags])
    app = serve.build_app(engine, serve.make_cfg(args, args.model_path, engine.long_video))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "the server to start", timeout=30)
        assert thread.is_alive()
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def counted(engine, monkeypatch):
    """Counts the frames decoded and the vision tower's calls."""
    import media
    n = SimpleNamespace(decoded=0, eva=0)
    upright, forward = media._upright, engine.model.vision.forward

    def decoded(frame):
        n.decoded += 1
        return upright(frame)

    def eva(*a, **kw):
        n.eva += 1
        return forward(*a, **kw)
    monkeypatch.setattr(media, "_upright", decoded)
    monkeypatch.setattr(engine.model.vision, "forward", eva)
    return n


def hold(port, body: bytes):
    """A chat request sent on a socket that the caller closes to walk away from it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return s


def chat_body(stream=False, max_tokens=NEW):
    return json.dumps({"model": "video", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                       "max_tokens": max_tokens}).encode()


def test_too_long_video_costs_no_decoding(engine, long_clip, counted):
    """A video over the context is refused from its packets' timestamps: no frame decoded, no EVA call, by the
    upload (which decoded and encoded all of it) and by a chat (which encoded up to the limit)."""
    import serve
    src = serve.make_source("video/mp4", "the upload", long_clip.read_bytes(), name="long.mp4")
    with pytest.raises(serve.APIError) as e:
        engine.describe(src)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    cfg = serve.make_cfg(engine.args, engine.args.model_path, False)
    req = serve.parse_chat(json.dumps({"messages": [ask(video_part(data_url(long_clip, "video/mp4")),
                                                        QUESTION)]}).encode(), cfg)
    job = SimpleNamespace(cancelled=False, check=lambda: None, emit=lambda *a: pytest.fail(f"emitted {a}"))
    with pytest.raises(serve.APIError) as e:
        engine.complete(req, job)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert (counted.decoded, counted.eva) == (0, 0)
    assert not any(key[0] == src.sha256 for key in engine.cache)


def test_media_cache_keeps_nothing_over_its_budget(world, engine):
    """An entry larger than --cache-mb is used but not kept (the newest was always kept); within the budget the
    least recently used goes first."""
    import serve
    import torch
    clip = serve.make_source("video/mp4", "clip", world.clip.read_bytes())
    image = serve.make_source("image/png", "image", world.png.read_bytes())
    limit = engine.cache_limit
    try:
        engine.cache.clear()
        engine.cache_bytes = 0
        with torch.no_grad():
            size = engine.media(clip).nbytes
        engine.cache.clear()
        engine.cache_bytes, engine.cache_limit = 0, size - 1
        assert engine.describe(clip)["frames"] == FRAMES  # still answered
        assert len(engine.cache) == 0 and engine.cache_bytes == 0
        engine.cache_limit = size
        engine.describe(clip)
        assert list(engine.cache) == [(clip.sha256, "video")] and engine.cache_bytes == size
        engine.describe(image)  # together over the budget: the clip goes, then the image fits alone
        assert list(engine.cache) == [(image.sha256, "image")] and engine.cache_bytes <= size
    finally:
        engine.cache.clear()
        engine.cache_bytes, engine.cache_limit = 0, limit


@pytest.fixture
def gate(monkeypatch):
    """model.generate replaced by one that waits for gate.open before its one token; gate.calls counts runs."""
    import model
    g = SimpleNamespace(open=threading.Event(), running=threading.Event(), calls=0)

    def gated(llm, embeds, max_new, callback=None, **kw):
        g.calls += 1
        g.running.set()
        assert g.open.wait(600)  # longer than any wait_for: a test fails on its own check first
        callback(torch_token())
    monkeypatch.setattr(model, "generate", gated)
    yield g
    g.open.set()  # whatever happened, nothing stays blocked


def torch_token():
    import torch
    return torch.tensor([TOKEN])


def test_client_that_leaves_stops_its_generation(engine, monkeypatch):
    """A non-streaming client that disconnects mid-answer ends the generation at the next token (it went on to
    max_tokens, holding the model from everyone else)."""
    import model
    first, outcome = threading.Event(), queue.Queue()

    def endless(llm, embeds, max_new, callback=None, **kw):
        callback(torch_token())
        first.set()
        for _ in range(3000):  # ~30 s at most: the cancelled run stops within a token of the disconnect
            time.sleep(0.01)
            if callback(torch_token()):  # generate's contract: a callback returning True ends generation
                outcome.put("stopped")
                return
        outcome.put("ran to the end")
    monkeypatch.setattr(model, "generate", endless)
    with served(engine) as srv:
        s = hold(srv.port, chat_body(max_tokens=3000))
        assert first.wait(60)
        s.close()
        assert outcome.get(timeout=90) == "stopped"
        wait_for(lambda: health(srv)["queued"] == 0, "the place to free")
        monkeypatch.undo()  # the real generate for the next request
        status, body = chat_request(srv, [{"role": "user", "content": "hi"}])
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_leaves_the_queue_costs_nothing(engine, gate, stream):
    """A request whose client disconnects while it waits frees its place at once and never runs (five
    abandoned requests used to run to max_tokens before the next user's)."""
    with served(engine) as srv:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(chat_request, srv, [{"role": "user", "content": "hi"}])
            try:
                assert gate.running.wait(60)
                s = hold(srv.port, chat_body(stream=stream))
                wait_for(lambda: health(srv)["queued"] == 2, "the second request to queue")
                s.close()
                wait_for(lambda: health(srv)["queued"] == 1, "the abandoned request to leave the queue")
            finally:
                gate.open.set()
            assert first.result()[0] == 200
        status, body = chat_request(srv, [{"role": "user", "content": "hi"}])
        assert status == 200 and body["usage"]["completion_tokens"] == 1
        assert gate.calls == 2  # the first and the last: not the abandoned one


def test_full_queue_answers_503_with_retry_after(engine, gate, world):
    """With --max-queue 1, one request runs, one waits, and the next chat or upload is refused at once (503,
    Retry-After) instead of queueing without limit; a place freed is taken again."""
    hi = [{"role": "user", "content": "hi"}]
    with served(engine, "--max-queue", "1") as srv:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(chat_request, srv, hi)
            try:
                assert gate.running.wait(60)
                waiting = pool.submit(chat_request, srv, hi)
                wait_for(lambda: health(srv)["queued"] == 2, "the second request to queue")
                for path, body, kind in (("/v1/chat/completions", chat_body(), "application/json"),
                                         ("/v1/media", world.clip.read_bytes(), "video/mp4")):
                    status, err, headers = fetch(srv, path, body, Content_Type=kind)
                    assert status == 503 and err["error"]["code"] == "server_busy", err
                    assert int(headers["Retry-After"]) >= 1 and "--max-queue 1" in err["error"]["message"]
            finally:
                gate.open.set()
            assert running.result()[0] == 200 and waiting.result()[0] == 200
        assert chat_request(srv, hi)[0] == 200
        assert gate.calls == 3 and health(srv)["max_queue"] == 1


def test_allowed_origins(engine):
    """--allowed-origins lets a listed site's pages call the server (with CORS headers for the browser) and
    serves its host name; others stay refused."""
    app = "http://app.example:3000"
    body = chat_body(max_tokens=2)
    with served(engine, "--allowed-origins", app) as srv:
        status, _, headers = fetch(srv, "/v1/chat/completions", body, Content_Type="application/json", Origin=app)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == app
        assert fetch(srv, "/health", Host="app.example:3000")[0] == 200
        status, err, _ = fetch(srv, "/v1/chat/completions", body, Content_Type="text/plain",
                               Origin="http://other.example")
        assert status == 403 and err["error"]["code"] == "forbidden_origin"


# ----------------------------------------------------------------------------------------------------------
# the page, in a real browser

@contextmanager
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, world, width, height):
    """The chat page, connected; and the list its script errors go to."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(30_000)
    page_errors = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(world.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('video')")
    return page, page_errors


def screenshot_path(tmp_path, suffix=""):
    shot = Path(os.environ.get("SERVE_SCREENSHOT", tmp_path / "serve_screenshot.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    return shot.with_name(shot.stem + suffix + shot.suffix)


def test_browser_chat(world, long_clip, tmp_path):
    shot = screenshot_path(tmp_path)
    with chromium() as browser:
        page, page_errors = open_page(browser, world, 1200, 760)
        page.set_input_files("#file", str(world.clip))
        page.wait_for_function(f"document.querySelectorAll('#frames img').length === {FRAMES}")
        assert "3 frames" in page.text_content("#media-info")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", str(NEW))
        page.fill("#question", QUESTION)
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']")
        assert page.text_content(".msg.assistant .text") == world.answer
        assert int(page.get_attribute(".msg.assistant", "data-chunks")) >= 2  # it arrived in pieces
        assert "prompt tokens" in page.text_content(".msg.assistant .meta")

        page.fill("#question", FOLLOW_UP)  # the second turn, sent with Enter, as sample.py's chat answers it
        page.press("#question", "Enter")
        page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='1']")
        assert page.text_content(".msg.assistant:nth-of-type(4) .text") == world.chat[1]
        page.screenshot(path=str(shot))

        page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a video"})
        page.wait_for_selector("#error", state="visible")
        assert "not an image or a video" in page.text_content("#error")

        def unchanged():  # a refused file leaves the conversation and its video as they were
            assert page.locator(".msg").count() == 4
            assert page.locator("#frames img").count() == FRAMES and page.locator("#preview video").count() == 1
            assert page.text_content("#media-info").startswith(f"{world.clip.name}: 3 frames")
        unchanged()
        # the file the server cannot decode: one sentence that names it once
        page.set_input_files("#file", {"name": "broken.mp4", "mimeType": "video/mp4", "buffer": b"not a video" * 50})
        page.wait_for_function("document.getElementById('error').textContent.startsWith('broken.mp4 ')")
        error = page.text_content("#error")
        assert error.count("broken.mp4") == 1 and "could not be read" not in error and "uploaded" not in error
        assert "Errno" not in error and error.count(": ") == 0, error
        unchanged()
        # a video too long for the context: said at upload
        page.set_input_files("#file", str(long_clip))
        page.wait_for_function("document.getElementById('error').textContent.startsWith('long.mp4 is too long')")
        assert "--max-frames" in page.text_content("#error")
        unchanged()
        page.screenshot(path=str(screenshot_path(tmp_path, "_refused")))

        with page.expect_request("**/v1/chat/completions") as sent:  # the third turn still carries the video
            page.fill("#question", QUESTION)
            page.press("#question", "Enter")
        messages = json.loads(sent.value.post_data)["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
        assert messages[0]["content"][0] == video_part(data_url(world.clip, "video/mp4"))
        page.wait_for_selector(".msg.assistant:nth-of-type(6)[data-done='1']")
        assert page.is_hidden("#error")
        assert page_errors == []


def test_browser_phone(world, tmp_path):
    """At 390 x 844 the conversation gets most of the screen (it had ~200 px under the player) and the last
    answer, its token counts included, is in view."""
    width, height = 390, 844
    with chromium() as browser:
        page, page_errors = open_page(browser, world, width, height)
        page.set_input_files("#file", str(world.clip))
        page.wait_for_function(f"document.querySelectorAll('#frames img').length === {FRAMES}")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "48")
        for question in (QUESTION, FOLLOW_UP):
            page.fill("#question", question)
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]').length === "
                                   f"{1 + (question == FOLLOW_UP)}")
        page.screenshot(path=str(screenshot_path(tmp_path, "_phone")))
        log = page.locator("#log").bounding_box()
        last = page.locator(".msg.assistant").last.bounding_box()
        assert log["height"] >= height / 2, log
        assert log["y"] <= last["y"] and last["y"] + last["height"] <= log["y"] + log["height"] + 1, (log, last)
        for box in (page.locator("#frames").bounding_box(), page.locator("#send").bounding_box()):
            assert box["y"] >= 0 and box["y"] + box["height"] <= height and box["x"] + box["width"] <= width
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # nothing sideways
        assert page_errors == []
