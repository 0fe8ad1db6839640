"""train.py on the fixture checkpoints: learning, the stage's frozen parts, exact resume, 1 vs 2 processes,
checkpoints in the original layout; the dataset's skipping, length grouping and safe feature import."""
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from data import LLaVADataset, Tokenizer, collate, length_grouped_order
from media import import_feature_pkl, write_video
from checkpoint import TRAIN_STATE, checkpoint_files, iter_tensors, latest_checkpoint
from model import LlamaVID

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, fixtures):
    d = tmp_path_factory.mktemp("data")
    for k in range(2):
        frames = np.zeros((4, 48, 64, 3), np.uint8)
        for t in range(4):
            frames[t, :, 10 * t + 5 * k:10 * t + 5 * k + 12] = (255, 80 * k, 0)
        write_video(d / f"v{k}.mp4", frames, fps=2)
    image = str(fixtures / "cases" / "image.png")
    samples = []
    for k in range(8):
        if k % 3 == 0:
            conv = [{"from": "human", "value": "<image>\nWhat is red?"}, {"from": "gpt", "value": "A circle."}]
            samples.append({"id": k, "image": image, "conversations": conv})
        elif k % 3 == 1:
            conv = [{"from": "human", "value": "What moves?\n<image>"}, {"from": "gpt", "value": "A bar."},
                    {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]
            samples.append({"id": k, "video": f"v{k % 2}.mp4", "conversations": conv})
        else:
            samples.append({"id": k, "conversations": [{"from": "human", "value": "Say hi"},
                                                       {"from": "gpt", "value": "hi"}]})
    (d / "data.json").write_text(json.dumps(samples))
    return d


def run(args, out, nproc=None, **kw):
    base = [f"--out_dir={out}", "--num_workers=0", "--learning_rate=1e-3", "--dropout=0.0", "--log_interval=1"]
    if nproc is None:
        return train.main(args + base + [f"--{k}={v}" for k, v in kw.items()])
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "train.py"] + args + base
    cmd += [f"--{k}={v}" for k, v in kw.items()]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line[line.index("{"):])["loss"] for line in res.stdout.splitlines() + res.stderr.splitlines()
            if '"loss"' in line]


def weights(folder):
    """Every tensor of the checkpoint at the top of folder, through its shard index."""
    return {k: v for f in checkpoint_files(folder) for k, v in iter_tensors(f)}


def stage2_args(fixtures, dataset):
    return ["--stage=2", f"--init_from={fixtures / 'video'}", f"--data_path={dataset / 'data.json'}",
            f"--video_folder={dataset}", "--global_batch_size=4", "--micro_batch_size=2"]


def test_stage2_learns_and_saves_original_layout(fixtures, dataset, tmp_path):
    losses = run(stage2_args(fixtures, dataset), tmp_path / "out", max_steps=6)
    assert losses[-1] < 0.8 * losses[0]
    out = tmp_path / "out"
    keys = set(weights(out))
    original = set(json.loads((fixtures / "video" / "pytorch_model.bin.index.json").read_text())["weight_map"])
    original = {k for k in original if "rotary_emb" not in k and "position_ids" not in k}
    assert original <= keys  # every key the original checkpoint has, under the same name
    assert all(k in keys or not k.startswith("model.vision_tower") for k in original)
    model = LlamaVID.from_pretrained(out)  # loads back as an original-layout checkpoint
    assert model.visual.cfg.compress_type == "mean"


def test_stage_freezing(fixtures, dataset, tmp_path):
    """Stage 1 trains only the projectors; stage 3 leaves every vlm_att_* module alone."""
    ref = LlamaVID.from_pretrained(fixtures / "video")
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    captions = [{"id": k, "image": str(fixtures / "cases" / "image.png"),
                 "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Shapes."}]}
                for k in range(2)]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    run(["--stage=1", f"--init_from={fixtures / 'video'}", f"--data_path={tmp_path / 'captions.json'}",
         f"--video_folder={dataset}", "--global_batch_size=2", "--micro_batch_size=2", "--template=plain_guided"],
        tmp_path / "s1", max_steps=2)
    run(["--stage=3", f"--init_from={fixtures / 'video'}", f"--data_path={dataset / 'data.json'}",
         f"--video_folder={dataset}", "--global_batch_size=2", "--micro_batch_size=2", "--max_len=8192"],
        tmp_path / "s3", max_steps=2)
    s1 = LlamaVID.from_pretrained(tmp_path / "s1").state_dict()
    s3 = LlamaVID.from_pretrained(tmp_path / "s3")
    for name, v in ref_state.items():
        trained1 = name.startswith(train.TRAINABLE[1])
        trained3 = name.startswith(train.TRAINABLE[3])
        assert torch.equal(s1[name], v) != trained1, name
        assert torch.equal(s3.state_dict()[name], v) != trained3, name
    assert (tmp_path / "s1" / "mm_projector.bin").exists()
    # stage 3 stretched RoPE linearly: ceil(8192 / 4096) = 2 on the fixture's 4096 positions
    assert s3.llm.cfg.rope_scaling == {"type": "linear",
                                       "factor": float(-(-8192 // ref.llm.cfg.max_seq_len))}


def test_resume_is_exact(fixtures, dataset, tmp_path):
    straight = run(stage2_args(fixtures, dataset), tmp_path / "a", max_steps=4, resume=False)
    run(stage2_args(fixtures, dataset), tmp_path / "b", max_steps=2, resume=False)
    resumed = run(stage2_args(fixtures, dataset), tmp_path / "b", max_steps=4)  # picks up checkpoint-2
    assert resumed[-2:] == straight[-2:]
    a = weights(tmp_path / "a")
    b = weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one(fixtures, dataset, tmp_path):
    """FSDP2 over 2 processes (gloo on the CPU) gives the losses of one process with the same global batch."""
    one = run(stage2_args(fixtures, dataset), tmp_path / "one", max_steps=3)
    two = run(stage2_args(fixtures, dataset), tmp_path / "two", nproc=2, max_steps=3)
    assert len(two) == 3
    assert np.allclose(one, two, rtol=1e-4), (one, two)


def test_visual_learning_rate_applies_to_the_token_generator_only(fixtures, dataset, tmp_path):
    """AdamW's first step moves every weight with a gradient by its group's rate (m / sqrt(v) = sign(g)): the LLM
    by learning_rate, the visual token generator by visual_learning_rate (no warm-up, no weight decay)."""
    ref = {k: v.clone() for k, v in LlamaVID.from_pretrained(fixtures / "video").state_dict().items()}
    run(stage2_args(fixtures, dataset), tmp_path / "out", max_steps=1, warmup_ratio=0.0, grad_clip=0.0,
        visual_learning_rate=1e-2)
    new = LlamaVID.from_pretrained(tmp_path / "out").state_dict()
    moved = {name: (new[name] - v).abs().max().item() for name, v in ref.items() if v.is_floating_point()}
    llm = {name: d for name, d in moved.items() if name.startswith("llm.") and d > 0}
    visual = {name: d for name, d in moved.items() if name.startswith("visual.") and d > 0}
    assert len(llm) > 10 and len(visual) > 10
    for name, d in llm.items():  # each tensor's largest move: an element whose gradient dwarfs Adam's eps
        assert d == pytest.approx(1e-3, rel=1e-3), name  # run()'s learning_rate
    for name, d in visual.items():
        if name.endswith(("k.bias", "key_projector.bias")):  # a key bias shifts a query's scores alike: grad ~0
            continue
        assert d == pytest.approx(1e-2, rel=1e-3), name


def test_resume_with_other_trainable_parts_is_refused_clearly(fixtures, dataset, tmp_path):
    run(stage2_args(fixtures, dataset) + ["--stage=1"], tmp_path / "out", max_steps=1)  # projectors only
    with pytest.raises(ValueError, match="optimizer state does not fit"):
        run(stage2_args(fixtures, dataset), tmp_path / "out", max_steps=2)  # stage 2 resuming stage 1's state


def test_learning_rate_schedules():
    """Hand-computed rates: 10 warm-up steps of 100, then a cosine to min_lr, or wsd's plateau and linear fall
    over the last 20 steps."""
    cfg = {"learning_rate": 1.0, "min_lr": 0.1, "warmup_ratio": 0.1, "cooldown_ratio": 0.2}
    cosine, wsd = train.Config(**cfg, lr_schedule="cosine"), train.Config(**cfg, lr_schedule="wsd")
    for sched in (cosine, wsd):
        assert [train.lr_at(s, 100, sched) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert train.lr_at(10, 100, cosine) == pytest.approx(1.0)
    assert train.lr_at(55, 100, cosine) == pytest.approx(0.55)  # half way through the cosine: the mean
    assert train.lr_at(99, 100, cosine) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))
    assert [train.lr_at(s, 100, wsd) for s in (10, 50, 79, 80, 90, 99)] == \
        pytest.approx([1.0, 1.0, 1.0, 1.0, 0.55, 0.145])


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown setting --learnig_rate"):
        train.get_config(["--learnig_rate=1"])


def test_config_file_then_overrides_over_fresh_defaults(tmp_path):
    """A config file sets settings and may define helper names of its own; --key=value reads Python literals,
    else plain strings, and overrides what came before it; each call starts from the defaults again (tests and
    scripts run main several times in one process)."""
    config = tmp_path / "run.py"
    config.write_text("root = 'runs'\nout_dir = root + '/a'\nllm_config = dict(dim=8)\nlearning_rate = 1e-3\n")
    c = train.get_config([str(config), "--learning_rate=3e-4", "--compress_type=None", "--image_folder=",
                          "--template=vicuna_v1", "--betas=(0.8, 0.9)"])
    assert (c.out_dir, c.llm_config, c.learning_rate) == ("runs/a", {"dim": 8}, 3e-4)
    assert c.compress_type is None and c.image_folder == "" and c.template == "vicuna_v1" and c.betas == (0.8, 0.9)
    assert not hasattr(c, "root")
    c.llm_config["n_layers"] = 2
    fresh = train.get_config([])
    assert (fresh.out_dir, fresh.llm_config, fresh.learning_rate, fresh.compress_type) == ("out/run", {}, 2e-5, "mean")


@pytest.mark.parametrize("args, error", [(["--learnig_rate=1"], "unknown setting --learnig_rate"),
                                         (["config/missing.py"], "config file config/missing.py does not exist"),
                                         (["--stage=4"], "stage 4 is not one of 1, 2, 3")])
def test_user_mistakes_are_one_line_errors(args, error):
    res = subprocess.run([sys.executable, "train.py"] + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "\n" not in res.stderr.strip() and res.stderr.startswith(f"error: {error}"), res.stderr


def test_log_line_says_where_the_time_goes(fixtures, dataset, tmp_path, capsys):
    """Every log_interval-th step prints its loss and rate, the time blocked on the loader, in forward + backward
    and in the optimizer step, and the tokens a second since the last line."""
    run(stage2_args(fixtures, dataset), tmp_path / "o", max_steps=4, log_interval=2, save_checkpoints=False)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert line["data_ms"] >= 0 and line["fwd_bwd_ms"] > 0 and line["optim_ms"] > 0 and line["tokens/s"] > 0
        assert line["eva_ms"] > 0  # the frozen EVA, timed apart from the forward and backward
        assert np.isfinite(line["loss"]) and line["lr"] > 0


# --- the dataset ---------------------------------------------------------------------------------------------

def test_unreadable_samples_are_skipped_and_counted(fixtures, tmp_path):
    samples = [{"id": 0, "video": "missing.mp4", "conversations": [{"from": "human", "value": "<image>\nx"},
                                                                   {"from": "gpt", "value": "y"}]},
               {"id": 1, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    data = LLaVADataset(tmp_path / "d.json", Tokenizer(fixtures / "video"), "imgsp_v1", video_folder=tmp_path)
    with pytest.warns(UserWarning, match="missing.mp4"):
        batch = collate([data[0], data[1]])
    assert batch["skipped"] == 1 and batch["input_ids"].shape[0] == 1


def test_cached_videos_are_decoded_once_and_unchanged(fixtures, tmp_path, monkeypatch):
    import data as data_module
    frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "v.mp4", frames, fps=1)
    conv = [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]
    (tmp_path / "d.json").write_text(json.dumps([{"id": i, "video": "v.mp4", "conversations": conv} for i in (0, 1)]))
    reads = []
    real = data_module.load_video
    monkeypatch.setattr(data_module, "load_video", lambda *a, **k: reads.append(a) or real(*a, **k))
    tok = Tokenizer(fixtures / "video")
    plain = LLaVADataset(tmp_path / "d.json", tok, "imgsp_v1", video_folder=tmp_path)
    cached = LLaVADataset(tmp_path / "d.json", tok, "imgsp_v1", video_folder=tmp_path, cache_videos=True)
    want = plain[0]["media"]
    assert len(reads) == 1
    got = [cached[i]["media"] for i in (0, 1, 0)]
    assert len(reads) == 2  # the cached dataset decoded its one video once
    for g in got:
        assert torch.equal(g.pixels, want.pixels)


def test_encoded_cache_serves_the_features_of_the_frames(fixtures, tmp_path):
    """fill_cache decodes every video up front; encode_cache then swaps the frames for what the (frozen) encoder
    makes of the pixels the uncached dataset gives, and samples carry those features."""
    frames = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "a.mp4", frames, fps=1)
    write_video(tmp_path / "b.mp4", frames[::-1].copy(), fps=1)
    conv = [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"},
            {"from": "human", "value": "z"}, {"from": "gpt", "value": "w"}]  # two turns: two prompts
    (tmp_path / "d.json").write_text(json.dumps([{"id": i, "video": v, "conversations": conv}
                                                 for i, v in enumerate(("a.mp4", "b.mp4", "a.mp4"))]))
    tok = Tokenizer(fixtures / "video")
    plain = LLaVADataset(tmp_path / "d.json", tok, "imgsp_v1", video_folder=tmp_path, image_size=28)
    cached = LLaVADataset(tmp_path / "d.json", tok, "imgsp_v1", video_folder=tmp_path, image_size=28,
                          cache_videos=True)
    assert cached.fill_cache() == 2 and len(cached.video_cache) == 2
    weight = torch.randn(5, 3 * 28 * 28)
    encode = lambda px: (px.flatten(1) @ weight.T)[:, None].expand(-1, 3, -1)  # (N, 1+2, 5)
    assert cached.encode_cache(encode, videos_per_call=1) == 2
    for i in range(3):
        want = encode(plain[i]["media"].pixels)
        assert torch.allclose(cached[i]["media"].features, want, atol=1e-5)
        assert torch.equal(cached[i]["input_ids"], plain[i]["input_ids"])
        assert cached[i]["prompts"] == plain[i]["prompts"] == ["x", "z"]


def test_length_grouping_keeps_modalities_apart():
    lengths = [5, -3, 40, -30, 7, 100, -2, 60, 9, -50, 3, 80]
    order = length_grouped_order(lengths, 2, seed=0)
    assert sorted(order) == list(range(len(lengths)))
    for k in range(0, len(order) - len(order) % 2, 2):
        pair = order[k:k + 2]
        assert (lengths[pair[0]] > 0) == (lengths[pair[1]] > 0)
    assert max(abs(lengths[i]) for i in order[:2]) == 100  # the longest group comes first


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_feature_pkl_import_is_safe(tmp_path):
    feats = np.random.rand(3, 5, 8).astype(np.float16)
    with open(tmp_path / "ok.pkl", "wb") as f:
        pickle.dump({"feats": feats, "inputs": "<image>Hello<image><image>"}, f)
    out = import_feature_pkl(tmp_path / "ok.pkl")
    back = load_file(str(out))["features"]
    assert np.array_equal(back.numpy(), feats)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"feats": feats, "x": Evil()}, f)
    with pytest.raises(ValueError, match="refusing to load posix.system|refusing to load os.system"):
        import_feature_pkl(tmp_path / "evil.pkl")


@pytest.mark.parametrize("quant", ["", "int8"])
def test_lora_stage2_trains_adapters_only(fixtures, dataset, tmp_path, quant):
    from lora import load_lora_model
    out = tmp_path / "lora"
    losses = run(stage2_args(fixtures, dataset) + ["--lora=True", "--lora_r=8", "--lora_alpha=16",
                                                    f"--lora_base_quant={quant}"], out, max_steps=6,
                 learning_rate=3e-3)
    assert losses[-1] < 0.8 * losses[0]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists() and not list(out.glob("pytorch_model*"))
    base = LlamaVID.from_pretrained(fixtures / "video")
    merged = load_lora_model(out, fixtures / "video")  # the base + our adapters + non-LoRA trainables, merged
    changed = [n for n, p in merged.llm.named_parameters() if not torch.equal(p, base.llm.state_dict()[n])]
    assert changed and all(n.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight",
                                       "w2.weight", "w3.weight")) for n in changed)
    if not quant:  # resuming restores the adapters and continues
        more = run(stage2_args(fixtures, dataset) + ["--lora=True", "--lora_r=8", "--lora_alpha=16"], out,
                   max_steps=8, learning_rate=3e-3)
        assert len(more) == 2


def test_overfits_a_handful_of_samples(fixtures, dataset, tmp_path):
    """A tiny model memorises 2 samples: the loss falls by more than 90 %."""
    samples = json.loads((dataset / "data.json").read_text())[:2]
    (tmp_path / "two.json").write_text(json.dumps(samples))
    losses = run(["--stage=2", f"--init_from={fixtures / 'video'}", f"--data_path={tmp_path / 'two.json'}",
                  f"--video_folder={dataset}", "--global_batch_size=2", "--micro_batch_size=2", "--warmup_ratio=0",
                  "--save_checkpoints=False"], tmp_path / "o", max_steps=40, learning_rate=3e-3)
    assert losses[-1] < 0.1 * losses[0], losses


def test_checkpoint_gives_the_in_memory_logits(fixtures, dataset, tmp_path):
    """What train.py writes loads (as sample.py loads it) into the model that was in memory: same logits."""
    import subprocess
    from data import Tokenizer, tokenize_with_images
    from media import image_media
    losses, trained = train.main(stage2_args(fixtures, dataset) + [f"--out_dir={tmp_path / 'o'}", "--num_workers=0",
                                                                   "--max_steps=2", "--learning_rate=1e-3"],
                                 return_model=True)
    loaded = LlamaVID.from_pretrained(tmp_path / "o")
    tok = Tokenizer(tmp_path / "o")
    ids = torch.tensor(tokenize_with_images("USER: <image>\nWhat is red? ASSISTANT:", tok))[None]
    image = image_media(fixtures / "cases" / "image.png", loaded.image_size)
    trained.eval()
    with torch.no_grad():
        a, _ = trained(ids, [image], [["What is red?"]])
        b, _ = loaded(ids, [image], [["What is red?"]])
    assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())
    res = subprocess.run([sys.executable, "sample.py", "--model-path", str(tmp_path / "o"), "--image",
                          str(fixtures / "cases" / "image.png"), "--question", "What is red?", "--device", "cpu",
                          "--temperature", "0", "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_kill_during_checkpoint_write_keeps_the_previous_one(fixtures, dataset, tmp_path, monkeypatch):
    out = tmp_path / "o"
    run(stage2_args(fixtures, dataset), out, max_steps=2, resume=False)
    before = weights(out)
    real = torch.save

    def dies_midway(obj, f, *args, **kw):
        if str(f).endswith(".bin"):  # a partial weight file, then the process dies
            Path(f).write_bytes(b"PK\x03\x04 cut short")
            raise KeyboardInterrupt("killed while writing")
        return real(obj, f, *args, **kw)
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run(stage2_args(fixtures, dataset), out, max_steps=4)
    monkeypatch.setattr(torch, "save", real)
    after = weights(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    ckpt, step = latest_checkpoint(out)
    assert step == 2 and torch.load(ckpt / TRAIN_STATE, weights_only=True)["step"] == 2
    LlamaVID.from_pretrained(out)  # still a whole checkpoint
    assert len(run(stage2_args(fixtures, dataset), out, max_steps=4)) == 2  # and it resumes from step 2


@pytest.mark.parametrize("config", ["stage1.py", "stage1_image336.py", "stage2.py", "stage2_image336.py",
                                    "stage3.py"])
def test_stage_configs_run_at_tiny_size(fixtures, dataset, tmp_path, config):
    """The recipe files run a couple of steps with the tiny fixture model in place of the 7B one."""
    data = dataset / "data.json"
    if config.startswith("stage1"):  # alignment data: captions
        data = tmp_path / "captions.json"
        data.write_text(json.dumps([{"id": k, "image": str(fixtures / "cases" / "image.png"), "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Shapes."}]} for k in range(2)]))
    losses = run([str(ROOT / "config" / config), f"--init_from={fixtures / 'video'}", f"--data_path={data}",
                  f"--video_folder={dataset}", "--image_folder=", "--global_batch_size=2", "--micro_batch_size=2",
                  "--max_len=8192", "--save_checkpoints=False"], tmp_path / "o", max_steps=2)
    assert len(losses) == 2 and all(np.isfinite(losses))
