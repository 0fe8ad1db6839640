"""The quick start: the synthetic shapes generator (deterministic, clips that show what their text says) and its
commands (shapes.py, config/shapes_stage1.py and config/shapes_stage2.py through train.py, then eval.py),
shortened, end to end, on the CPU."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from data import Tokenizer, image_first, preprocess
from media import load_video
from shapes import COLOURS, QUESTION_TYPES, TIME_ORDER_TYPES, make_shapes_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", n_train=6, n_val=6, seed=3)
    b = make_shapes_dataset(tmp_path / "b", n_train=6, n_val=6, seed=3)
    c = make_shapes_dataset(tmp_path / "c", n_train=6, n_val=6, seed=4)
    fa, fb = files_of(a), files_of(b)
    assert fa.keys() == fb.keys()
    for name in ("train.json", "val.json", "captions.json", "tokenizer.model", "bert/vocab.txt"):
        assert fa[name].read_bytes() == fb[name].read_bytes(), name
    for name in fa:
        if name.endswith(".mp4"):
            assert np.array_equal(load_video(fa[name], fps=None)[0], load_video(fb[name], fps=None)[0]), name
    assert (a / "train.json").read_text() != (c / "train.json").read_text()  # another seed, other clips


def test_clips_show_what_their_text_says(tmp_path):
    """Every val question records its type, and each event is visible in the decoded frames: a pixel of the
    object's quarter of the frame (7 px below its centre: inside a square, a triangle and a ring alike) has the
    colour the event says, before and after it."""
    import random
    from shapes import shapes_clip
    out = make_shapes_dataset(tmp_path, n_train=8, n_val=12, seed=0, frames=16, size=64, fps=2)
    val = json.loads((out / "val.json").read_text())
    assert [v["type"] for v in val] == [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(12)]
    assert all(v["conversations"][0]["value"].startswith("<image>\n") for v in val)
    kinds = set()
    for i in range(8):
        clip = shapes_clip(random.Random(f"shapes-0-train-{i}"), 16, 64)  # the recipe of train_0000i.mp4
        frames = load_video(out / "videos" / f"train_{i:05d}.mp4", fps=None)[0].astype(int)
        assert frames.shape == (16, 64, 64, 3)
        bg = np.full(3, clip["background"])

        def pixel(t, cell):  # below the centre of a quarter of the 64 x 64 frame
            return frames[t, (cell // 2) * 32 + 16 + 7, (cell % 2) * 32 + 16]
        for e in clip["events"]:
            o, t = clip["objects"][e["object"]], e["frame"]
            colour = np.array(COLOURS[o["colour"]])
            # a move starts a frame early (a third of the way there), and the previous event is 3+ frames back
            before, after = pixel(t - 2, o["cell"]), pixel(t + 1, o["cell"])
            expect_after = {"appear": colour, "disappear": bg, "move": bg}.get(e["kind"])
            if e["kind"] == "turn":
                expect_after = np.array(COLOURS[e["to"]])
            assert np.abs(before - (bg if e["kind"] == "appear" else colour)).max() < 30, (i, e)
            assert np.abs(after - expect_after).max() < 30, (i, e)
            if e["kind"] == "move":
                assert np.abs(pixel(t - 2, e["to"]) - bg).max() < 30
                assert np.abs(pixel(t + 1, e["to"]) - colour).max() < 30
            kinds.add(e["kind"])
        assert [e["frame"] for e in clip["events"]] in ([3, 7, 11], [3, 7], [3, 11], [7, 11])
    assert len(kinds) >= 3


def test_time_order_answers_follow_the_events(tmp_path):
    """The time-order answers are read off the caption's sequence: "after X" is the event the caption lists
    right after X, "before X" the one right before it, and "Which happens first: X or Y?" whichever of the two
    it lists first."""
    out = make_shapes_dataset(tmp_path, n_train=30, n_val=6, seed=1)
    captions = {c["video"]: c["conversations"][1]["value"] for c in json.loads((out / "captions.json").read_text())}
    n, orders = 0, []
    for s in json.loads((out / "train.json").read_text()):
        conv = s["conversations"]
        for t, kind in enumerate(s["types"]):
            q, a = conv[2 * t]["value"].replace("<image>\n", ""), conv[2 * t + 1]["value"]
            events = captions[s["video"]].split(". ", 1)[1].rstrip(".").split(", then ")
            if kind == "after":
                assert events[events.index(q[len("What happens after "):-1]) + 1] == a
                n += 1
            elif kind == "before":
                assert events[events.index(q[len("What happens before "):-1]) - 1] == a
                n += 1
            elif kind == "order":
                x, y = q[len("Which happens first: "):-1].split(" or ")
                assert a == min(x, y, key=events.index)
                orders.append(a == x)
    assert n > 10 and 0 < sum(orders) < len(orders)  # the earlier event is named first in some questions, not all


def test_no_sample_loses_its_labels(tmp_path):
    """The SentencePiece vocabulary holds every piece the chat template needs (e.g. "USER" glued to "</s>"):
    no sample hits the original's tokenization-mismatch rule, which would mask all its labels."""
    out = make_shapes_dataset(tmp_path, n_train=40, n_val=6, seed=2)
    tokenizer = Tokenizer(out)
    train = json.loads((out / "train.json").read_text())
    assert any(len(s["conversations"]) > 2 for s in train)
    import random
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s in train:
            ids, labels, prompts = preprocess(image_first(s["conversations"]), tokenizer, "imgsp_v1",
                                              rng=random.Random(0))
            assert (ids == 0).sum() == 0 and (labels != -100).sum() > 0
            assert len(prompts) == len(s["conversations"]) // 2


def test_system_sentence_is_one_piece(tmp_path):
    """Vicuna's system sentence opens every prompt; the quick start's vocabulary holds it as a single piece, so it
    costs the tiny LLM one position instead of ~30, and the label arithmetic of the template still holds."""
    from data import SYSTEM_VICUNA, build_prompt
    out = make_shapes_dataset(tmp_path, n_train=12, n_val=2, seed=3)
    tokenizer = Tokenizer(out)
    assert len(tokenizer.encode(SYSTEM_VICUNA, bos=False)) == 1
    prompt = build_prompt([("USER", "What happens to the circle?"), ("ASSISTANT", None)], "imgsp_v1")
    ids = tokenizer.encode(prompt, bos=False)
    assert tokenizer.decode(ids) == prompt and len(ids) < 20


# --- end to end: data, stage 1, stage 2, eval --------------------------------------------------------------

def text_only_accuracy(val):
    """Per question type, the share of its commonest answer: the best a model that ignores the video can do by
    always giving one answer to a question type (it may do a little better from the question's wording)."""
    from collections import Counter
    out = {}
    for kind in QUESTION_TYPES:
        answers = [v["conversations"][1]["value"] for v in val if v["type"] == kind]
        out[kind] = 100 * Counter(answers).most_common(1)[0][1] / len(answers)
    return out


def test_quick_start_end_to_end(tmp_path):
    """The quick start's commands (python shapes.py, train.py config/shapes_stage1.py, then
    config/shapes_stage2.py) shortened to ~2 minutes (800 clips, 5 stage-1 steps, 1,600 stage-2 steps at a
    constant rate), then eval.py. (At 1,200 steps the model is only starting to read the video: whether it
    cleared the bars below turned on which of the clips' encodings a run of shapes.py wrote, as libx264's bytes
    vary from process to process.)
    A model that does not read the visual tokens stays at the commonest answer of each question type; this one
    must beat that by 8 points overall and by 15 on the colour and change questions together, and lose 10
    points overall when its context tokens are zeroed (docs/LOG.md gives what runs here scored)."""
    data, s1, s2 = tmp_path / "data", tmp_path / "s1", tmp_path / "s2"
    where = [f"--video_folder={data}", f"--bert_path={data / 'bert'}"]
    commands = [
        ["shapes.py", f"--out_dir={data}", "--n_train=800", "--n_val=120"],
        ["train.py", "config/shapes_stage1.py", f"--data_path={data / 'captions.json'}", f"--tokenizer_dir={data}",
         f"--out_dir={s1}", "--max_steps=5"] + where,
        # no cool-down: this short a run is still in its fast part
        ["train.py", "config/shapes_stage2.py", f"--data_path={data / 'train.json'}", f"--init_from={s1}",
         f"--out_dir={s2}", "--max_steps=1600", "--min_lr=3e-4"] + where,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for command in commands:
        res = subprocess.run([sys.executable] + command, cwd=ROOT, capture_output=True, text=True, env=env,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "eval.py", "--model-path", str(s2), "--questions",
                          str(data / "val.json"), "--zero-context", "--threads", "2"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((s2 / "results_val.json").read_text())["results"]
    print(res.stdout)
    baseline = text_only_accuracy(json.loads((data / "val.json").read_text()))
    print("text-only baseline:", baseline)
    normal = results["normal"]
    assert normal["overall"]["n"] == 120 and set(normal) >= set(QUESTION_TYPES) | {"time-order"}
    assert TIME_ORDER_TYPES[0] in results["zero-context"]
    assert normal["overall"]["accuracy"] >= sum(baseline.values()) / len(baseline) + 8
    perception = ("colour", "change")
    assert sum(normal[k]["accuracy"] for k in perception) >= sum(baseline[k] for k in perception) + 2 * 15
    assert normal["overall"]["accuracy"] >= results["zero-context"]["overall"]["accuracy"] + 10
