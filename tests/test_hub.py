"""Checkpoints by Hugging Face Hub id, the EVA download and the BERT vocabulary, against a fake Hub on 127.0.0.1
serving the fixture checkpoint (the endpoints and headers huggingface_hub's snapshot_download and hf_hub_download
use). Nothing here reaches the network."""
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from checkpoint import checkpoint_dir
from model import LlamaVID

hub_constants = pytest.importorskip("huggingface_hub.constants")

REPO = "YanweiLi/llama-vid-tiny-video"  # the fixture's video checkpoint, as the Hub serves it
EVA_PATH = "/LAVIS/models/BLIP2/eva_vit_g.pth"


class FakeHub:
    """repos: id -> {file name: bytes}; files: URL path -> bytes (the EVA weights); short: URL paths whose body
    stops halfway (a dropped connection). requests: (method, path) of every request, in order."""

    def __init__(self):
        self.repos, self.files, self.short, self.requests = {}, {}, set(), []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub_.answer(self, body=False)

            def do_GET(self):
                hub_.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def sha(repo):
        return hashlib.sha1(repo.encode()).hexdigest()

    def answer(self, h, body):
        path = h.path.split("?")[0]
        self.requests.append((h.command, path))
        if path in self.files:
            data = self.files[path]
            return self.send(h, 200, data[:len(data) // 2] if path in self.short else data, body,
                             {"Content-Length": str(len(data))})
        m = (re.fullmatch(r"/api/models/(.+)/(revision|tree)/([^/]+)", path)
             or re.fullmatch(r"/(.+)/(resolve)/([^/]+)/(.+)", path))
        if not m or m.group(1) not in self.repos:
            return self.send(h, 404, b'{"error": "Repository not found"}', body, {"X-Error-Code": "RepoNotFound"})
        repo, kind, rev = m.group(1), m.group(2), m.group(3)
        files, sha = self.repos[repo], self.sha(repo)
        if rev not in ("main", sha):
            return self.send(h, 404, b'{"error": "Invalid rev id"}', body, {"X-Error-Code": "RevisionNotFound"})
        if kind == "revision":  # repo_info
            info = {"id": repo, "modelId": repo, "sha": sha, "private": False, "gated": False, "disabled": False,
                    "siblings": [{"rfilename": f} for f in sorted(files)]}
            return self.send(h, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        if kind == "tree":  # list_repo_tree, recursive: every file in one page
            tree = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for f, d in sorted(files.items())]
            return self.send(h, 200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        name = m.group(4)
        if name not in files:
            return self.send(h, 404, b'{"error": "Entry not found"}', body,
                             {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        data = files[name]
        self.send(h, 200, data, body, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                       "Content-Length": str(len(data))})

    @staticmethod
    def send(h, status, data, body, headers):
        h.send_response(status)
        headers.setdefault("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def read_dir(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def fake_hub(fixtures):
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def served(fake_hub, fixtures):
    """The fake Hub holding the fixture's video checkpoint (plus files a checkpoint does not need, which must not
    be fetched), bert-base-uncased's vocabulary, and eva_vit_g.pth at the LAVIS path."""
    fake_hub.repos.clear(), fake_hub.files.clear(), fake_hub.short.clear(), fake_hub.requests.clear()
    repo = read_dir(fixtures / "video")
    repo.update({"README.md": b"# tiny", "training_args.bin": b"not needed", "checkpoint-10/pytorch_model.bin": b"x"})
    fake_hub.repos[REPO] = repo
    fake_hub.repos["bert-base-uncased"] = read_dir(fixtures / "bert-base-uncased")
    fake_hub.files[EVA_PATH] = (fixtures / "eva_vit_g.pth").read_bytes()
    return fake_hub


def use_hub(monkeypatch, tmp_path, endpoint, offline=False):
    """The environment of a process started with HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE and our cache variables
    set. huggingface_hub reads them into huggingface_hub.constants when imported, so those are set too."""
    home = tmp_path / "hf"
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_ENDPOINT": endpoint,
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "LLAMAVID_CACHE": str(tmp_path / "llamavid"), "LLAMAVID_EVA_URL": endpoint + EVA_PATH}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    c = hub_constants
    for name, value in [("HF_HOME", str(home)), ("HF_HUB_CACHE", str(home / "hub")), ("ENDPOINT", endpoint),
                        ("HF_HUB_OFFLINE", offline), ("HF_HUB_DISABLE_TELEMETRY", True)]:
        monkeypatch.setattr(c, name, value)
    if hasattr(c, "HUGGINGFACE_CO_URL_TEMPLATE"):
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.chdir(tmp_path)  # config.json's mm_vision_tower is read relative to the working directory
    return home / "hub"


def closed_port_url():
    """An endpoint on 127.0.0.1 where nothing listens: what a machine without a network sees."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def one_line(e):
    """The message, checked to be one line with no huggingface_hub traceback chained to it."""
    msg, err = str(e.value), e.value
    assert "\n" not in msg and err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), msg
    return msg


def test_load_by_hub_id_equals_local_directory(served, fixtures, monkeypatch, tmp_path):
    cache = use_hub(monkeypatch, tmp_path, served.url)
    by_id = LlamaVID.from_pretrained(REPO)
    local = LlamaVID.from_pretrained(fixtures / "video", vision_path=fixtures / "eva_vit_g.pth",
                                     bert_path=fixtures / "bert-base-uncased")
    assert_same_model(by_id, local)
    assert by_id.visual.wordpiece.vocab == local.visual.wordpiece.vocab
    assert by_id.visual.cfg == local.visual.cfg  # the head count too, which no tensor shape shows

    folder = checkpoint_dir(REPO)  # a second call finds the snapshot the first one made
    assert folder.is_relative_to(cache / "models--YanweiLi--llama-vid-tiny-video" / "snapshots")
    want = {f for f in read_dir(fixtures / "video")}
    assert {p.name for p in folder.iterdir()} == want  # only what a checkpoint needs
    fetched = {p for m, p in served.requests if m == "GET" and "/resolve/" in p}
    assert not any("training_args" in p or "checkpoint-10" in p or "README" in p for p in fetched)
    assert (cache / "models--bert-base-uncased").is_dir()

    eva = tmp_path / "llamavid" / "eva_vit_g.pth"
    assert eva.read_bytes() == (fixtures / "eva_vit_g.pth").read_bytes()
    assert [p.name for p in eva.parent.iterdir()] == ["eva_vit_g.pth"]
    LlamaVID.from_pretrained(REPO)  # the EVA weights are fetched once
    assert served.requests.count(("GET", EVA_PATH)) == 1


def test_offline_loads_from_the_cache_without_a_server(served, fixtures, monkeypatch, tmp_path):
    use_hub(monkeypatch, tmp_path, served.url)
    online = LlamaVID.from_pretrained(REPO)
    use_hub(monkeypatch, tmp_path, closed_port_url(), offline=True)
    served.requests.clear()
    offline = LlamaVID.from_pretrained(REPO)
    assert served.requests == []
    assert_same_model(online, offline)


def test_hub_errors_are_one_line(served, monkeypatch, tmp_path):
    use_hub(monkeypatch, tmp_path, served.url)
    with pytest.raises(ValueError) as e:  # no such repository
        checkpoint_dir("YanweiLi/no-such-model")
    assert "YanweiLi/no-such-model" in one_line(e) and "Hugging Face Hub" in str(e.value)

    repo = dict(served.repos[REPO])
    del repo["pytorch_model-00003-of-00004.bin"]  # a shard its index lists
    served.repos["someone/incomplete"] = repo
    with pytest.raises(FileNotFoundError) as e:
        checkpoint_dir("someone/incomplete")
    assert "someone/incomplete" in one_line(e) and "pytorch_model-00003-of-00004.bin" in str(e.value)

    served.repos["bert-base-uncased"].pop("vocab.txt")
    with pytest.raises(FileNotFoundError) as e:
        LlamaVID.from_pretrained(REPO)
    assert "bert-base-uncased" in one_line(e) and "vocab.txt" in str(e.value)


def test_no_network_is_one_line(fixtures, monkeypatch, tmp_path):
    url = closed_port_url()
    use_hub(monkeypatch, tmp_path, url)
    with pytest.raises(FileNotFoundError) as e:
        checkpoint_dir(REPO)
    msg = one_line(e)
    assert REPO in msg and url in msg and "could not be reached" in msg

    use_hub(monkeypatch, tmp_path, url, offline=True)
    with pytest.raises(FileNotFoundError) as e:
        checkpoint_dir(REPO)
    assert REPO in one_line(e) and "HF_HUB_OFFLINE" in str(e.value)


def test_a_local_path_not_made_yet_is_named_as_one(served, monkeypatch, tmp_path):
    """'out/run' looks like a Hub id; a user who has not trained it yet must learn that no such directory exists,
    whether the Hub answers, cannot be reached or is switched off."""
    monkeypatch.chdir(tmp_path)
    for url, offline, error in ((served.url, False, ValueError), (closed_port_url(), False, FileNotFoundError),
                                (closed_port_url(), True, FileNotFoundError)):
        use_hub(monkeypatch, tmp_path, url, offline=offline)
        with pytest.raises(error) as e:
            checkpoint_dir("out/llama-vid-7b-pretrain-224-video")
        msg = one_line(e)
        assert "out/llama-vid-7b-pretrain-224-video" in msg and "local" in msg, msg
        assert ("check the path" in msg) or ("neither a local directory" in msg), msg


def test_eva_download_never_leaves_a_partial_file(served, fixtures, monkeypatch, tmp_path):
    use_hub(monkeypatch, tmp_path, served.url)
    served.short.add(EVA_PATH)  # the connection drops halfway
    with pytest.raises(FileNotFoundError) as e:
        LlamaVID.from_pretrained(REPO)
    assert "eva_vit_g.pth" in one_line(e) and EVA_PATH in str(e.value)
    assert not (tmp_path / "llamavid").exists() or list((tmp_path / "llamavid").iterdir()) == []

    served.short.clear()
    monkeypatch.setenv("LLAMAVID_EVA_URL", served.url + "/elsewhere/eva_vit_g.pth")  # a 404
    with pytest.raises(FileNotFoundError) as e:
        LlamaVID.from_pretrained(REPO)
    assert "Not Found" in one_line(e) and "--vision-path" in str(e.value)


def test_local_paths_never_ask_the_hub(fixtures, monkeypatch, tmp_path):
    """A local directory loads as before, without huggingface_hub and without downloading anything; a Hub id
    without huggingface_hub says how to install it."""
    use_hub(monkeypatch, tmp_path, closed_port_url())
    assert checkpoint_dir(fixtures / "video") == fixtures / "video"
    assert checkpoint_dir(str(fixtures / "video")) == fixtures / "video"
    assert checkpoint_dir("./no/such") == Path("./no/such") and checkpoint_dir("/no/such") == Path("/no/such")
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)  # as if it were not installed
    LlamaVID.from_pretrained(fixtures / "video")
    with pytest.raises(ValueError) as e:
        checkpoint_dir(REPO)
    assert REPO in one_line(e) and "pip install" in str(e.value) and "huggingface_hub" in str(e.value)

    bare = tmp_path / "ckpt"  # neither EVA weights nor a vocabulary: a local directory reports them missing
    bare.mkdir()
    for f in (fixtures / "video").iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        LlamaVID.from_pretrained(bare)
    with pytest.raises(FileNotFoundError, match="eva_vit_g.pth"):
        LlamaVID.from_pretrained(bare, bert_path=fixtures / "bert-base-uncased")
    (tmp_path / "llamavid").mkdir()  # the download cache is the last place looked in
    (tmp_path / "llamavid" / "eva_vit_g.pth").write_bytes((fixtures / "eva_vit_g.pth").read_bytes())
    LlamaVID.from_pretrained(bare, bert_path=fixtures / "bert-base-uncased")


def test_sample_command_by_hub_id(served, fixtures, monkeypatch, tmp_path):
    """`sample.py --model-path OWNER/NAME` answers as the local checkpoint does, from a directory holding nothing."""
    import os
    import subprocess
    import sys
    import numpy as np
    from media import write_video
    use_hub(monkeypatch, tmp_path, served.url)
    frames = np.zeros((4, 48, 48, 3), np.uint8)
    frames[:, 10:30, 10:30] = (200, 40, 40)
    write_video(tmp_path / "clip.mp4", frames, fps=2)
    root = Path(__file__).resolve().parents[1]
    args = ["--video", tmp_path / "clip.mp4", "--question", "What is it?", "--device", "cpu", "--dtype", "float32",
            "--temperature", "0", "--max-new-tokens", "6"]

    def run(model, cwd):
        p = subprocess.run([sys.executable, str(root / "sample.py"), "--model-path", str(model), *map(str, args)],
                           cwd=cwd, capture_output=True, text=True, env=dict(os.environ), timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout
    local = run(fixtures / "video", root)
    assert run(REPO, tmp_path) == local
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    p = subprocess.run([sys.executable, str(root / "sample.py"), "--model-path", "YanweiLi/other", *map(str, args)],
                       cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error:"), p.stderr


def test_train_fine_tunes_a_checkpoint_by_hub_id(served, fixtures, monkeypatch, tmp_path):
    """train.py's init_from takes a Hub id: two stage-2 steps from the served checkpoint, the same losses as from
    the local directory."""
    import json
    import train
    use_hub(monkeypatch, tmp_path, served.url)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]
    (tmp_path / "data.json").write_text(json.dumps([{"id": k, "image": str(fixtures / "cases" / "image.png"),
                                                     "conversations": conv} for k in range(4)]))
    common = [f"--data_path={tmp_path / 'data.json'}", "--global_batch_size=2", "--micro_batch_size=2",
              "--max_steps=2", "--num_workers=0", "--dropout=0.0", "--save_checkpoints=False"]
    local = train.main(common + [f"--init_from={fixtures / 'video'}", f"--out_dir={tmp_path / 'a'}",
                                 f"--vision_path={fixtures / 'eva_vit_g.pth'}",
                                 f"--bert_path={fixtures / 'bert-base-uncased'}"])
    by_id = train.main(common + [f"--init_from={REPO}", f"--out_dir={tmp_path / 'b'}"])
    assert by_id == local and len(by_id) == 2


def test_eval_and_serve_take_a_hub_id(served, fixtures, monkeypatch, tmp_path):
    """eval.py --model-path OWNER/NAME gives the local checkpoint's answers; serve.py's command line loads the same
    weights and serves them under the repository's name."""
    import eval as E
    import serve
    from chat import load_model_from_args
    use_hub(monkeypatch, tmp_path, served.url)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": "image.png", "category": "random", "label": "yes",
                                     "text": f"Is there a thing {i} in the image?"}) + "\n" for i in range(2)))

    def answers(model, out):
        E.main(["--benchmark", "pope", "--model-path", str(model), "--questions", str(q), "--image-folder",
                str(fixtures / "cases"), "--answers", str(out), "--batch-size", "2", "--max-new-tokens", "4",
                "--device", "cpu", "--dtype", "float32"])
        return [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert answers(REPO, tmp_path / "hub.jsonl") == answers(fixtures / "video", tmp_path / "local.jsonl")

    args = serve.parse_args(["--model-path", REPO, "--device", "cpu", "--dtype", "float32"])
    model, _, _ = load_model_from_args(args)
    assert_same_model(model, LlamaVID.from_pretrained(fixtures / "video", vision_path=fixtures / "eva_vit_g.pth",
                                                      bert_path=fixtures / "bert-base-uncased"))
    assert serve.make_cfg(args, args.model_path, model.is_long_video)["model_name"] == "llama-vid-tiny-video"
