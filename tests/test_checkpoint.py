"""What train.py leaves in out_dir: a checkpoint the original code loads by its own steps, a resume that runs no
code from the directory, a save that a kill at any file operation leaves whole (old or new), and a resume from
any stage that continues bit for bit as if never interrupted."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import train
from checkpoint import checkpoint_files, iter_tensors
from model import LlamaVID

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 400_000  # a few shards for the tiny model (transformers' default of 10GB gives one)


def weights(folder):
    """Every tensor of the checkpoint in folder, read through its index as our loader reads it."""
    return {k: v for f in checkpoint_files(folder) for k, v in iter_tensors(f)}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def get_w(weights, keyword):
    """The original's rule for a module's weights in a checkpoint: every key containing keyword, cut after it."""
    return {k.split(keyword + ".")[1]: v for k, v in weights.items() if keyword in k}


@pytest.fixture(scope="module")
def captions(fixtures, tmp_path_factory):
    d = tmp_path_factory.mktemp("captions")
    image = str(fixtures / "cases" / "image.png")
    samples = [{"id": k, "image": image, "conversations": [{"from": "human", "value": "<image>"},
                                                           {"from": "gpt", "value": text}]}
               for k, text in enumerate(["Shapes.", "A red circle.", "Colours on white.", "A picture."])]
    (d / "captions.json").write_text(json.dumps(samples))
    return d / "captions.json"


def scratch_args(fixtures, captions):
    """Stage 1 on a random model of the fixture checkpoint's shapes (EVA at 56 px to stay fast): its output must
    carry the names and shapes of what the original wrote at those shapes."""
    ref = LlamaVID.from_pretrained(fixtures / "video", vision_path=fixtures / "eva_vit_g.pth",
                                   bert_path=fixtures / "bert-base-uncased")
    vision = {**dataclasses.asdict(ref.vision.cfg), "img_size": 56}
    qformer = dataclasses.asdict(ref.visual.cfg.qformer)
    return ["--stage=1", "--init_from=scratch", f"--tokenizer_dir={fixtures}",
            f"--bert_path={fixtures / 'bert-base-uncased'}", "--template=plain_guided", f"--data_path={captions}",
            "--image_size=56", f"--llm_config={dataclasses.asdict(ref.llm.cfg)!r}", f"--vision_config={vision!r}",
            f"--token_config={ {'qformer': qformer}!r}", f"--compress_type={ref.visual.cfg.compress_type}",
            f"--bert_type={ref.hf_config['bert_type']}", "--global_batch_size=2", "--micro_batch_size=2",
            "--num_workers=0", "--learning_rate=1e-3", "--gradient_checkpointing=False",
            f"--max_shard_size={SHARD_BYTES}", "--max_steps=6", "--save_interval=3", "--seed=3"]


@pytest.fixture(scope="module")
def scratch_run(fixtures, captions, tmp_path_factory):
    """(args, out_dir, losses, model in memory) of an uninterrupted 6-step stage-1 run from scratch."""
    args = scratch_args(fixtures, captions)
    out = tmp_path_factory.mktemp("scratch") / "out"
    losses, model = train.main(args + [f"--out_dir={out}"], return_model=True)
    return args, out, losses, model


# --- the original loads it ---------------------------------------------------------------------------------

def test_the_original_finds_every_tensor_it_looks_up(fixtures, scratch_run):
    """The steps of the original's builder.load_pretrained_model and initialize_attention_modules, on train.py's
    output: config.json's fields, the tokenizer's size, pytorch_model.bin.index.json, the shards it names
    (torch.load, tensors only), the LLM in transformers' LlamaForCausalLM (strict), the projector modules as the
    original builds them (strict), the vlm_att_* names and shapes the original wrote itself at these shapes
    (the fixture checkpoint), and values equal to the model in memory."""
    import sentencepiece
    import transformers
    _, out, _, trained = scratch_run
    cfg = json.loads((out / "config.json").read_text())

    # LlavaConfig is a LlamaConfig of model_type "llava"; fields the builder reads with defaults that would
    # change the model: mm_use_im_patch_token (default True: a token added, the embeddings resized),
    # pretrain_mm_mlp_adapter / pretrain_qformer (set: weights read from those files instead)
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaLlamaAttForCausalLM"]
    assert cfg["mm_use_im_patch_token"] is False and cfg["mm_use_im_start_end"] is False
    assert cfg.get("pretrain_mm_mlp_adapter") is None and cfg.get("pretrain_qformer") is None
    assert re.search("lavis|eva", cfg["mm_vision_tower"].lower())  # the EVA tower, not CLIP
    assert "qformer" in cfg["bert_type"] and "pretrain" in cfg["bert_type"]  # vlm_att_query, vlm_att_ln are read
    assert cfg["num_query"] == trained.visual.cfg.num_query
    assert cfg["compress_type"] == trained.visual.cfg.compress_type
    # resize_token_embeddings(len(tokenizer)) must change nothing
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == cfg["vocab_size"]
    assert (out / "tokenizer_config.json").is_file() and (out / "special_tokens_map.json").is_file()

    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    weight_map = index["weight_map"]
    names = list(dict.fromkeys(weight_map.values()))
    n = len(names)
    assert n > 1 and names == [f"pytorch_model-{i:05d}-of-{n:05d}.bin" for i in range(1, n + 1)]
    shards = {name: torch.load(out / name, map_location="cpu", weights_only=True) for name in names}
    state = {}
    for name, shard in shards.items():
        assert isinstance(shard, dict) and all(isinstance(v, torch.Tensor) for v in shard.values())
        assert set(shard) == {k for k, f in weight_map.items() if f == name}
        state.update(shard)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    # transformers 4.31's sharding: in order, a new shard only when the next tensor would not fit
    sizes = [[v.numel() * v.element_size() for v in shard.values()] for shard in shards.values()]
    for this, following in zip(sizes, sizes[1:] + [None]):
        assert sum(this) <= SHARD_BYTES or len(this) == 1
        assert following is None or sum(this) + following[0] > SHARD_BYTES

    # from_pretrained: the LLM's tensors into LlamaForCausalLM, strictly, and its logits are ours
    token_parts = ("model.vlm_att_", "model.mm_projector.")
    llm = {k: v for k, v in state.items() if not k.startswith(token_parts + ("model.vision_tower.",))}
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(llm, strict=True)
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = trained.llm.eval()(ids), hf(ids).logits
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()

    # build_vision_projector from config.json, loaded from model.mm_projector.*
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", cfg["mm_projector_type"]).group(1))
    layers = [nn.Linear(cfg["mm_hidden_size"], cfg["hidden_size"])]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(cfg["hidden_size"], cfg["hidden_size"])]
    projector = nn.Sequential(*layers)
    projector.load_state_dict(get_w(state, "mm_projector"), strict=True)
    x = torch.randn(3, cfg["mm_hidden_size"])
    with torch.no_grad():
        assert torch.equal(projector(x), trained.visual.mm_projector(x))

    # initialize_attention_modules: the shards whose keys name a trainable module, torch.load'ed
    trainable_module = ["vlm_att_encoder", "vlm_att_projector", "vlm_att_key_projector", "vlm_att_val_projector",
                        "vlm_att_query", "vlm_att_visual_proj", "vlm_att_ln"]
    att = {}
    for f in {weight_map[k] for k in weight_map if any(m in k for m in trainable_module)}:
        att.update(torch.load(out / f, map_location="cpu", weights_only=True))
    original = weights(fixtures / "video")  # what the original's training wrote at these shapes

    def shapes(w):  # the original adds the Q-Former's position_ids buffer itself when a checkpoint lacks it
        return {k: tuple(v.shape) for k, v in w.items() if not k.endswith("position_ids")}
    assert shapes(get_w(att, "vlm_att_encoder")) == shapes(get_w(original, "vlm_att_encoder"))
    assert shapes({k: v for k, v in state.items() if k.startswith(token_parts)}) == \
        shapes({k: v for k, v in original.items() if k.startswith(token_parts)})
    bert_width = original["model.vlm_att_query"].shape[-1]
    mm, hidden = cfg["mm_hidden_size"], cfg["hidden_size"]
    modules = {"vlm_att_projector": nn.Linear(bert_width, mm), "vlm_att_key_projector": nn.Linear(mm, mm),
               "vlm_att_val_projector": nn.Linear(mm, hidden), "vlm_att_ln": nn.LayerNorm(mm)}
    own = dict(trained.visual.named_parameters())
    for name, module in modules.items():
        module.load_state_dict(get_w(att, name), strict=True)
        for k, v in module.state_dict().items():
            assert torch.equal(v, own[f"{name}.{k}"]), name
    assert att["model.vlm_att_query"].shape == (1, cfg["num_query"], bert_width)
    assert torch.equal(att["model.vlm_att_query"], own["vlm_att_query"])
    assert not get_w(att, "vlm_att_bert_proj")  # EVA's width is the Q-Former's vision width: no such layer

    # stage 1's mm_projector.bin, which the original's stage 2 reads as pretrain_mm_mlp_adapter: every
    # parameter of the projector and the vlm_att_* modules, as in the shards
    adapter = torch.load(out / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert shapes(adapter) == shapes({k: v for k, v in state.items() if k.startswith(token_parts)})
    assert all(torch.equal(v, state[k]) for k, v in adapter.items())
    projector.load_state_dict(get_w(adapter, "mm_projector"), strict=True)

    # every other value, through our loader: the model that was in memory
    loaded = LlamaVID.from_pretrained(out).state_dict()
    own = trained.state_dict()
    assert loaded.keys() == own.keys() and all(torch.equal(loaded[k], own[k]) for k in own)


# --- resume runs no code from the directory ------------------------------------------------------------------

class RunsCode:
    """Unpickled by plain pickle, this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_train_state_that_would_run_code_is_refused(fixtures, captions, tmp_path):
    args = ["--stage=2", f"--init_from={fixtures / 'video'}", f"--data_path={captions}", "--global_batch_size=2",
            "--micro_batch_size=2", "--num_workers=0"]
    out, marker = tmp_path / "out", tmp_path / "code-ran"
    train.main(args + [f"--out_dir={out}", "--max_steps=1"])
    states = sorted(out.rglob("train_state.pt"))
    assert states
    for path in states:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["extra"] = RunsCode(marker)
        torch.save(state, path)
    res = subprocess.run([sys.executable, "train.py"] + args + [f"--out_dir={out}", "--max_steps=2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("error:") and "train_state.pt" in err and "system" in err


# --- a kill at any moment of a save ---------------------------------------------------------------------------

# For k = 1, 2, ...: a child process runs train.py's main into BASE/kill<k> and is SIGKILLed at the k-th operation
# that moves, links or removes a file during its second save (nested calls, as rmtree's own unlinks, belong to
# the outer one), until a child finishes. The children are forked from this script before it computes anything
# (no thread pool to inherit), which spares each one starting Python and importing torch.
KILLER = r"""
import os, shutil, signal, sys
import train
base, args = sys.argv[1], sys.argv[2:]
saves, moves, inside = [0], [0], [False]
real_save = train.save_checkpoint

def save(*a, **kw):
    saves[0] += 1
    return real_save(*a, **kw)

def killing(fn, kill_at):
    def call(*a, **kw):
        if saves[0] == 2 and not inside[0]:
            moves[0] += 1
            if moves[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        was, inside[0] = inside[0], True
        try:
            return fn(*a, **kw)
        finally:
            inside[0] = was
    return call

for k in range(1, 40):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            train.save_checkpoint = save
            for name in ("rename", "replace", "link", "symlink", "unlink", "remove", "rmdir"):
                setattr(os, name, killing(getattr(os, name), k))
            shutil.rmtree = killing(shutil.rmtree, k)
            train.main(args + [f"--out_dir={base}/kill{k}"])
            print("finished", k, "after", moves[0], "operations", flush=True)
            code = 0
        finally:
            os._exit(code)
    status = os.waitpid(pid, 0)[1]
    if os.WIFEXITED(status):
        sys.exit(os.WEXITSTATUS(status))
    print("killed", k, os.WTERMSIG(status), flush=True)
sys.exit(3)
"""


def test_a_kill_at_every_file_operation_of_a_save_resumes_exactly(fixtures, captions, tmp_path, capsys):
    """Saves at steps 2, 4 and 6; a process dies at each file operation of the step-4 save in turn. The top of
    out_dir then holds a whole model or none, and the resumed run ends with the uninterrupted run's losses and
    weights, bit for bit."""
    args = ["--stage=2", f"--init_from={fixtures / 'video'}", f"--data_path={captions}", "--global_batch_size=2",
            "--micro_batch_size=2", "--num_workers=0", "--learning_rate=1e-3", "--max_steps=6",
            "--save_interval=2"]
    want_losses = train.main(args + [f"--out_dir={tmp_path / 'straight'}"])
    want = weights(tmp_path / "straight")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the floats of this process
    res = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path)] + args, cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    killed = [int(k) for k, sig in re.findall(r"killed (\d+) (\d+)", res.stdout) if int(sig) == signal.SIGKILL]
    n = int(re.search(r"finished (\d+) after (\d+) operations", res.stdout).group(2))
    assert killed == list(range(1, n + 1)) and n >= 3, res.stdout
    assert same_tensors(weights(tmp_path / f"kill{n + 1}"), want)  # the child that was never killed
    resumed_at = []
    for k in killed:
        out = tmp_path / f"kill{k}"
        if (out / "pytorch_model.bin.index.json").exists():  # the top: a whole checkpoint's model, or none
            top = weights(out)
            assert any(same_tensors(top, weights(d)) for d in out.glob("checkpoint-*") if d.is_dir()), k
        capsys.readouterr()
        losses = train.main(args + [f"--out_dir={out}"])
        said = re.findall(r"resumed from (\S+) at step (\d+)", capsys.readouterr().out)
        assert len(said) == 1, k
        path, step = said[0][0], int(said[0][1])
        assert path == str(out / f"checkpoint-{step}") and step in (2, 4), (k, said)
        resumed_at.append(step)
        assert losses == want_losses[step:], k
        assert same_tensors(weights(out), want), k
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-6"]
    assert resumed_at[0] == 2 and resumed_at[-1] == 4  # killed before the switch to step 4, and after it


# --- resume from scratch, stage 1 ------------------------------------------------------------------------------

def test_stage1_from_scratch_resumes_bit_for_bit(scratch_run, tmp_path, monkeypatch):
    """Interrupted after its step-3 save and resumed, a stage-1 run from a random model (float32 EVA, which
    a float16 copy would round) ends with the uninterrupted run's losses and every tensor."""
    args, straight, want_losses, want_model = scratch_run
    out = tmp_path / "out"
    real = train.save_checkpoint

    def save_then_die(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt("killed after the first save")
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + [f"--out_dir={out}"])
    monkeypatch.setattr(train, "save_checkpoint", real)
    losses, model = train.main(args + [f"--out_dir={out}"], return_model=True)
    assert losses == want_losses[3:]
    got, want = model.state_dict(), want_model.state_dict()
    assert got.keys() == want.keys()
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, differ
    assert same_tensors(weights(out), weights(straight))


# --- resume under FSDP ---------------------------------------------------------------------------------------

# In each of the processes, one process group: an uninterrupted run, then a run stopped right after its first
# save, then its resume.
TWO_RUNS = r"""
import json, sys
import torch.distributed as dist
import train
base, args = sys.argv[1], sys.argv[2:]
straight = train.main(args + [f"--out_dir={base}/straight"])
real = train.save_checkpoint

class Stop(Exception):
    pass

def save_then_stop(*a, **kw):
    real(*a, **kw)
    raise Stop
train.save_checkpoint = save_then_stop
try:
    train.main(args + [f"--out_dir={base}/resumed"])
except Stop:  # (process 0 stops once it has written, the other at once: they meet before resuming)
    dist.barrier()
train.save_checkpoint = real
resumed = train.main(args + [f"--out_dir={base}/resumed"])
if dist.get_rank() == 0:
    print("losses", json.dumps([straight, resumed]))
dist.destroy_process_group()
"""


def test_two_processes_resume_exactly(fixtures, captions, tmp_path):
    """FSDP2 over 2 processes (gloo on the CPU), stage 2 with dropout: every process gets its own RNG back, and the
    optimizer state loads although the Q-Former's last text layer never had a gradient."""
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS)
    args = ["--stage=2", f"--init_from={fixtures / 'video'}", f"--data_path={captions}", "--global_batch_size=4",
            "--micro_batch_size=1", "--num_workers=0", "--learning_rate=1e-3", "--max_steps=4", "--save_interval=2"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
                          str(tmp_path)] + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    straight, resumed = json.loads(re.search(r"^losses (.*)$", res.stdout, re.M).group(1))
    assert len(straight) == 4 and resumed == straight[2:]
    assert same_tensors(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))
