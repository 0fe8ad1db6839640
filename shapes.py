"""The quick start's data: short synthetic clips of coloured shapes that appear, disappear, change colour or move to
another quarter of the frame, and questions about what happens when, so that a model must read the frames in order;
a tokenizer and a WordPiece vocabulary fitted to that text. Everything follows from the seed.

python shapes.py                       # writes out/shapes_data (once; again only when its settings change)
python shapes.py --n_train=800 --out_dir=out/shapes_small
"""
import io
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data import ROLES, SYSTEM_VICUNA, build_prompt
from media import write_video


SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (225, 40, 40), "green": (40, 190, 60), "blue": (40, 90, 235), "yellow": (235, 215, 40)}
EVENTS = ("appear", "disappear", "turn", "move")
NUMBERS = ("none", "one", "two", "three")
TIME_ORDER_TYPES = ("after", "before", "order")  # answerable only by comparing the frames in order
QUESTION_TYPES = TIME_ORDER_TYPES + ("colour", "change", "count")
BACKGROUND = 120  # a grey near CLIP's mean: after normalisation the background is ~0, the shapes stand out
# near-lossless H.264; x264's macroblock tree (its rate control looking ahead) made about 1 clip in 300 encode to
# other bytes from one process to another: without it the same clips are the same files
CLIP_ENCODING = {"crf": "10", "mbtree": "0"}
SHAPES_VERSION = 8  # written to manifest.json: a dataset of another version (or other arguments) is rewritten


def shapes_clip(rng, frames=16, size=64):
    """A random clip description: 2-3 objects (distinct shapes and colours, each in its own quarter of the
    frame) and one event for each, at one of three fixed frames (3, 7 and 11 of 16: near a quarter, half and
    three quarters of the clip). Objects sit at the centre of their quarter: a shape drifting across the ViT's
    patch grid looks different to a random (untrained) EVA at every offset. One that moves goes to the free
    quarter: a third of the way in the frame before its event's, two thirds in the event's frame, there from
    the next one on (so any 1-in-2 sampling sees it travel: a random EVA has no position embeddings, only the
    shape seen off the grid shows a move)."""
    if frames < 12:
        raise ValueError(f"a shapes clip needs at least 12 frames for its events, got {frames}")
    n_obj = rng.choice((2, 3, 3))
    shapes, colours, cells = rng.sample(SHAPES, n_obj), rng.sample(list(COLOURS), n_obj), rng.sample(range(4), 4)
    objects = [{"shape": shapes[k], "colour": colours[k], "cell": cells[k]} for k in range(n_obj)]
    # three fixed moments: a small LLM learns "which came first" in fewer samples when events sit at a few places
    # in the sequence than anywhere in it (two quiet frames at each end, 3+ frames apart from 12 frames on)
    times = sorted(rng.sample([frames * k // 4 - 1 for k in (1, 2, 3)], n_obj))
    events, moved = [], False
    for t, k in zip(times, rng.sample(range(n_obj), n_obj)):
        kind = rng.choice(EVENTS if not moved else EVENTS[:3])  # one move a clip: there is one free quarter
        event = {"frame": t, "object": k, "kind": kind}
        if kind == "turn":
            event["to"] = rng.choice([c for c in COLOURS if c != objects[k]["colour"]])
        elif kind == "move":
            event["to"], moved = cells[n_obj], True
        events.append(event)
    return {"frames": frames, "size": size, "background": BACKGROUND, "r": 0.17 * size, "objects": objects,
            "events": events}


def _object_state(clip, k, t):
    """(present, colour, (x, y) centre in pixels) of object k in frame t."""
    o = clip["objects"][k]
    colour, present, cell, half = o["colour"], True, o["cell"], clip["size"] / 4
    centre = lambda c: ((c % 2) * 2 * half + half, (c // 2) * 2 * half + half)  # noqa: E731
    x, y = centre(cell)
    for e in clip["events"]:
        if e["object"] == k:
            if e["kind"] == "appear":
                present = t >= e["frame"]
            elif e["kind"] == "disappear":
                present = t < e["frame"]
            elif e["kind"] == "turn" and t >= e["frame"]:
                colour = e["to"]
            elif e["kind"] == "move" and t >= e["frame"] - 1:
                (x1, y1), w = centre(e["to"]), min(1.0, (t - e["frame"] + 2) / 3)
                x, y = x + w * (x1 - x), y + w * (y1 - y)
    return present, colour, (x, y)


def render_shapes_clip(clip):
    """The clip's frames, uint8 (T, size, size, 3)."""
    T, S, r = clip["frames"], clip["size"], clip["r"]
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    video = np.full((T, S, S, 3), clip["background"], np.uint8)
    for k, o in enumerate(clip["objects"]):
        for t in range(T):
            present, colour, (x, y) = _object_state(clip, k, t)
            if not present:
                continue
            dx, dy = xx - x, yy - y
            if o["shape"] == "square":
                mask = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
            elif o["shape"] == "circle":  # a ring: a filled disc would look much like the square to EVA
                mask = (dx ** 2 + dy ** 2 <= r ** 2) & (dx ** 2 + dy ** 2 >= (0.55 * r) ** 2)
            else:  # a triangle pointing up: apex r above the centre, base r below it
                mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
            video[t][mask] = COLOURS[colour]
    return video


def _event_text(clip, e):
    o = clip["objects"][e["object"]]
    name = f"the {o['colour']} {o['shape']}"  # each object has one event at most: its colour before it
    verb = {"appear": "appears", "disappear": "disappears", "move": "moves"}.get(e["kind"], f"turns {e.get('to')}")
    return f"{name} {verb}"


def shapes_caption(clip):
    """What the clip shows, in order: the stage-1 caption."""
    start = [f"a {c} {o['shape']}" for k, o in enumerate(clip["objects"])
             for present, c, _ in [_object_state(clip, k, 0)] if present]
    start = " and ".join([", ".join(start[:-1]), start[-1]] if len(start) > 1 else start) or "an empty frame"
    return f"{start}. " + ", then ".join(_event_text(clip, e) for e in clip["events"]) + "."


def shapes_question(clip, kind, rng):
    """(question, answer) of one question type about a clip (see QUESTION_TYPES, and "describe"); None when
    the clip cannot pose it (after / before need three events)."""
    events, T = clip["events"], clip["frames"]
    text = [_event_text(clip, e) for e in events]
    if kind == "describe":  # (training only) every event in order, as the caption tells them
        return rng.choice(("Describe what happens.", "What happens in the video?")), shapes_caption(clip)
    if kind in ("after", "before") and len(events) < 3:
        return None  # with two events "after X" is "the other one": no need to know the order
    if kind == "after":  # the event right after a given one
        i = rng.randrange(len(events) - 1)
        return f"What happens after {text[i]}?", text[i + 1]
    if kind == "before":
        i = rng.randrange(1, len(events))
        return f"What happens before {text[i]}?", text[i - 1]
    if kind == "order":  # two events, named in either order: the answer names the earlier one
        a, b = rng.sample(range(len(events)), 2)
        return f"Which happens first: {text[a]} or {text[b]}?", text[min(a, b, key=lambda i: events[i]["frame"])]
    k = rng.randrange(len(clip["objects"]))
    shape = clip["objects"][k]["shape"]
    if kind == "colour":
        when = [w for w, t in (("start", 0), ("end", T - 1)) if _object_state(clip, k, t)[0]]
        when = rng.choice(when)
        return f"What colour is the {shape} at the {when}?", _object_state(clip, k, 0 if when == "start" else T - 1)[1]
    if kind == "change":
        e = next((e for e in events if e["object"] == k), None)
        answer = "nothing" if e is None else {"appear": "it appears", "disappear": "it disappears",
                                              "move": "it moves"}.get(e["kind"], f"it turns {e.get('to')}")
        return f"What happens to the {shape}?", answer
    if kind == "count":
        when = rng.choice(("start", "end"))
        t = 0 if when == "start" else T - 1
        n = sum(_object_state(clip, k, t)[0] for k in range(len(clip["objects"])))
        return f"How many shapes are there at the {when}?", NUMBERS[n]
    raise ValueError(f"unknown shapes question type {kind!r}: use one of {', '.join(QUESTION_TYPES)}")


def write_shapes_clip(path, seed, frames=16, size=64, fps=2):
    """Write one clip (a fresh one for any seed) and return (clip description, {type: (question, answer)})."""
    rng = random.Random(f"shapes-clip-{seed}")
    clip = shapes_clip(rng, frames, size)
    write_video(path, render_shapes_clip(clip), fps=fps, options=CLIP_ENCODING)
    questions = {kind: shapes_question(clip, kind, rng) for kind in QUESTION_TYPES}
    return clip, {kind: qa for kind, qa in questions.items() if qa is not None}


# training question mix, plus "describe" (answer: the caption, every event in order). Binding a colour to a shape is
# what the time-order answers build on, and the slowest skill to learn: colour and change are weighted up; count is
# learned first (docs/LOG.md)
TRAIN_TYPE_WEIGHTS = {"after": 2, "before": 2, "order": 2, "colour": 2, "change": 2, "count": 1, "describe": 1}


def make_shapes_dataset(out_dir, n_train=2000, n_val=300, seed=0, frames=16, size=64, fps=2, vocab_size=512,
                        samples_per_clip=2, multi_turn=0.5, qformer_heads=4, force=False):
    """Write the synthetic shapes dataset to out_dir; nothing is done when out_dir already holds this one.

    videos/{train,val}_NNNNN.mp4; train.json (LLaVA format, `samples_per_clip` question samples a clip, a
    `multi_turn` share of them with 2-3 turns; TRAIN_TYPE_WEIGHTS mixes the types); captions.json (one stage-1
    caption a train clip, plain_guided form: human "<image>", gpt caption); val.json (one question a val clip,
    types in turn, each item with its "type"); tokenizer.model + tokenizer_config.json (a LLaMA-style
    SentencePiece BPE with byte fallback, trained on the train text); bert/vocab.txt + bert/config.json (the
    Q-Former's WordPiece vocabulary: BERT's specials, then the lower-case words of the questions)."""
    out = Path(out_dir)
    args = {"version": SHAPES_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed, "frames": frames,
            "size": size, "fps": fps, "vocab_size": vocab_size, "samples_per_clip": samples_per_clip,
            "multi_turn": multi_turn, "qformer_heads": qformer_heads}
    manifest = out / "manifest.json"
    if not force and manifest.is_file() and json.loads(manifest.read_text()) == args:
        return out
    if n_train < 1 or n_val < 0:
        raise ValueError(f"make_shapes_dataset needs n_train >= 1 and n_val >= 0, got {n_train} and {n_val}")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # written last: a run cut short is redone
    kinds, weights = list(TRAIN_TYPE_WEIGHTS), list(TRAIN_TYPE_WEIGHTS.values())
    train, captions, val, text, questions = [], [], [], [], []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            rng = random.Random(f"shapes-{seed}-{split}-{i}")  # a clip does not depend on n_train / n_val
            kind = QUESTION_TYPES[i % len(QUESTION_TYPES)] if split == "val" else None
            while True:  # (a val clip is drawn again until it can pose its question type)
                clip = shapes_clip(rng, frames, size)
                qa = shapes_question(clip, kind, rng) if kind else ()
                if qa is not None:
                    break
            video = f"videos/{split}_{i:05d}.mp4"
            write_video(out / video, render_shapes_clip(clip), fps=fps, options=CLIP_ENCODING)
            if split == "val":
                q, a = qa
                val.append({"id": f"val_{i:05d}", "video": video, "type": kind, "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
                continue
            caption = shapes_caption(clip)
            captions.append({"id": f"cap_{i:05d}", "video": video, "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]})
            text.append(caption)
            for j in range(samples_per_clip):
                n_turns = rng.choice((2, 3)) if rng.random() < multi_turn else 1
                conv, types = [], []
                while len(types) < n_turns:  # weighted draws, no type twice in a conversation
                    kind = rng.choices(kinds, weights)[0]
                    qa = None if kind in types else shapes_question(clip, kind, rng)
                    if qa is None:
                        continue
                    q, a = qa
                    conv += [{"from": "human", "value": (f"<image>\n{q}" if not conv else q)},
                             {"from": "gpt", "value": a}]
                    types.append(kind)
                    questions.append(q)
                train.append({"id": f"train_{i:05d}_{j}", "video": video, "types": types, "conversations": conv})
                text.append(build_prompt([(ROLES[c["from"]], c["value"].replace("<image>\n", "")) for c in conv],
                                         "vicuna_v1"))
    for name, items in (("train.json", train), ("captions.json", captions), ("val.json", val)):
        (out / name).write_text(json.dumps(items, indent=1))
    write_tokenizer(out, text, vocab_size)
    _write_shapes_wordpiece(out / "bert", questions, qformer_heads)
    manifest.write_text(json.dumps(args))
    return out


def write_tokenizer(out, text, vocab_size):
    """out/tokenizer.model + tokenizer_config.json: a LLaMA-style SentencePiece model (BPE, byte fallback, digits split, <unk>=0 <s>=1 </s>=2, no
    normalisation) trained on the captions and the conversations as the chat template writes them."""
    model = io.BytesIO()  # (a model_prefix would be stored in the file: the same data would differ by folder)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, model_type="bpe",
        # a later turn starts "</s>USER:", where the legacy=False rule looks up "USER" without its "▁" (as
        # Vicuna's vocabulary has it): both must be pieces, or that turn's labels are all masked. Vicuna's
        # system sentence, the same at the start of every prompt, is one piece: 1 position, not ~30 (a third
        # of a sample's positions and of the LLM's work in training)
        user_defined_symbols=["\u2581USER", "USER", "\u2581" + SYSTEM_VICUNA.replace(" ", "\u2581")],
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "model_max_length": 2048}, indent=2))


def _write_shapes_wordpiece(out, questions, heads):
    """bert-style vocab.txt ([PAD]=0, [UNK], [CLS], [SEP], [MASK], then punctuation and lower-case words, so
    no question needs word pieces) and a config.json (model_type bert) giving the Q-Former's head count."""
    out.mkdir(parents=True, exist_ok=True)
    words = sorted({w for q in questions for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", q.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (out / "vocab.txt").write_text("".join(w + "\n" for w in vocab))
    (out / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(vocab), "hidden_size": 64,
                                                 "num_attention_heads": heads}, indent=2))


def main(argv):
    """--key=value overrides of make_shapes_dataset's arguments (as train.py takes its settings)."""
    kwargs = {"out_dir": "out/shapes_data", "n_train": 4000, "n_val": 300}
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not value:
            raise ValueError(f"arguments are --key=value, got {arg!r}")
        kwargs[key] = value if key == "out_dir" else json.loads(value)
    print(f"shapes data in {make_shapes_dataset(**kwargs)}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
