"""Evaluate a LLaMA-VID checkpoint on a question file: answer every question (batched, greedy decoding), append
each answer to a .jsonl as it comes (a rerun skips what is answered), then score the answers for a benchmark.

python eval.py --model-path out/shapes --questions out/shapes_data/val.json --media-folder out/shapes_data
"""
import argparse
import contextlib
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------------
# questions


def load_questions(path):
    """The questions of a file as dicts {question_id, question, video | image, answer?, type?}.

    A LLaVA-format JSON list (items with "conversations"): every human turn is one question, the gpt turn after
    it its reference answer; an item of several turns gives ids "<id>_<turn>", its turns asked one at a time.
    A .jsonl of LLaVA eval questions: {"question_id", "text" (or "question"), "image" / "video", "answer"?,
    "category" / "type"?} a line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} does not exist")
    text = path.read_text()
    try:
        items = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON{' lines' if path.suffix == '.jsonl' else ''} ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path} must hold a JSON list of questions (LLaVA format) or one question a line (.jsonl)")
    out = []
    for n, item in enumerate(items):
        media = {k: item[k] for k in ("video", "image") if k in item}
        if "conversations" not in item:
            question = item.get("text", item.get("question"))
            if question is None or "question_id" not in item:
                raise ValueError(f"{path}, question {n}: needs 'question_id' and 'text' (or 'conversations')")
            out.append({"question_id": str(item["question_id"]), "question": question.replace("<image>", "").strip(),
                        "answer": item.get("answer"), "type": item.get("type", item.get("category")), **media})
            continue
        conv = item["conversations"]
        humans = [i for i, c in enumerate(conv) if c["from"] == "human"]
        types = item.get("types") or [item.get("type")] * len(humans)
        for turn, i in enumerate(humans):
            qid = str(item.get("id", n)) if len(humans) == 1 else f"{item.get('id', n)}_{turn}"
            answer = conv[i + 1]["value"] if i + 1 < len(conv) else None
            out.append({"question_id": qid, "question": conv[i]["value"].replace("<image>", "").strip(),
                        "answer": answer, "type": types[turn] if turn < len(types) else None, **media})
    ids = [q["question_id"] for q in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} holds duplicate question ids: give every item a unique 'id' / 'question_id'")
    return out


def load_media(question, folder, model, fps, max_frames):
    """The pixels a question's video or image gives the model: (T, 3, S, S), or None for a text question."""
    from data import load_image, load_video
    from vision import preprocess_frames, preprocess_images
    if "video" in question:
        frames, _ = load_video(Path(folder) / question["video"], fps=fps, max_frames=max_frames)
        return preprocess_frames(frames, model.image_size)
    if "image" in question:
        pad = model.hf_config.get("image_aspect_ratio") == "pad"
        return preprocess_images([load_image(Path(folder) / question["image"])], model.image_size, pad_to_square=pad)
    return None


# ----------------------------------------------------------------------------------------------------------
# the generic runner


@contextlib.contextmanager
def zero_context(model):
    """Inside this block every frame's context token (the first of its 1 + n visual tokens, made by the
    question-guided Q-Former) is zero, so the model answers from the content tokens alone."""
    visual = model.visual
    forward = visual.forward

    def forward_without_context(features, prompts, long_video=False):
        tokens = forward(features, prompts, long_video=long_video)  # (P, T * (1 + n), dim)
        per_frame = tokens.view(tokens.shape[0], features.shape[0], -1, tokens.shape[-1]).clone()
        per_frame[:, :, 0] = 0
        return per_frame.flatten(1, 2)
    visual.forward = forward_without_context  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield model
    finally:
        del visual.forward


def model_id(model_path):
    """Names the weights an answer came from: a rerun with other weights does not reuse old answers."""
    files = sorted(p for p in Path(model_path).iterdir() if p.suffix in (".safetensors", ".bin"))
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{Path(model_path).name}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"


def read_answers(path, mid):
    """Answers already in the .jsonl for these weights (question_id -> record); others are dropped."""
    path = Path(path)
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = {r["question_id"]: r for r in records if r.get("model_id") == mid}
    if len(kept) != len(records):
        print(f"{path}: {len(records) - len(kept)} answer(s) of other weights dropped", file=sys.stderr)
        path.write_text("".join(json.dumps(r) + "\n" for r in kept.values()))
    return kept


@torch.no_grad()
def answer_questions(model, tokenizer, questions, answers_path, media_folder, mid, batch_size=16,
                     max_new_tokens=32, fps=1.0, max_frames=None, template="vicuna_v1"):
    """Answer the questions not yet in answers_path, batch by batch, greedily; every batch's answers are
    appended (and flushed) before the next starts. Returns all records of these weights, in question order."""
    from data import IMAGE_TOKEN, build_prompt, tokenize_with_images
    from tqdm import tqdm
    done = read_answers(answers_path, mid)
    todo = [q for q in questions if q["question_id"] not in done]
    dev, dtype = model.llm.output.weight.device, model.llm.output.weight.dtype
    Path(answers_path).parent.mkdir(parents=True, exist_ok=True)
    with open(answers_path, "a") as f, tqdm(total=len(questions), initial=len(questions) - len(todo),
                                            desc=f"answering ({Path(answers_path).name})", file=sys.stderr) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            ids, media = [], []
            for q in batch:
                pixels = load_media(q, media_folder, model, fps, max_frames)
                human = q["question"] if pixels is None else f"{IMAGE_TOKEN}\n{q['question']}"
                ids.append(torch.tensor(tokenize_with_images(build_prompt([("USER", human), ("ASSISTANT", None)],
                                                                          template), tokenizer), device=dev))
                media.append(None if pixels is None else pixels.to(dev, dtype))
            new = model.generate(ids, media, [[q["question"]] for q in batch], max_new_tokens=max_new_tokens,
                                 temperature=0.0, eos_id=tokenizer.eos_id)
            for q, row in zip(batch, new.tolist()):
                row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
                record = {"question_id": q["question_id"], "prompt": q["question"], "text": tokenizer.decode(row).strip(),
                          "answer": q.get("answer"), "type": q.get("type"), "model_id": mid}
                f.write(json.dumps(record) + "\n")
                done[q["question_id"]] = record
            f.flush()
            bar.update(len(batch))
    return [done[q["question_id"]] for q in questions]


# ----------------------------------------------------------------------------------------------------------
# scorers: records -> {row name: {"accuracy": %, "n": count}}


def normalize(text):
    """Lower case, single spaces, no surrounding punctuation: 'The red square.' == 'the red square'."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def score_shapes(records):
    """Exact match (after normalize) per question type of the shapes dataset, the time-order types together,
    and overall."""
    from data import QUESTION_TYPES, TIME_ORDER_TYPES
    rows = {}

    def add(name, subset):
        if subset:
            hits = sum(normalize(r["text"]) == normalize(r["answer"]) for r in subset)
            rows[name] = {"accuracy": 100.0 * hits / len(subset), "n": len(subset)}
    for kind in QUESTION_TYPES:
        add(kind, [r for r in records if r["type"] == kind])
    add("time-order", [r for r in records if r["type"] in TIME_ORDER_TYPES])
    add("overall", records)
    return rows


SCORERS = {"shapes": score_shapes}


def print_table(results, file=sys.stdout):
    """One row per scorer row, one column per run (e.g. normal / zero-context)."""
    names = list(results)
    rows = list(dict.fromkeys(r for res in results.values() for r in res))
    print(f"{'':<12}" + "".join(f"{n:>16}" for n in names) + f"{'n':>7}", file=file)
    for r in rows:
        cells = "".join(f"{results[n][r]['accuracy']:>15.1f}%" if r in results[n] else f"{'-':>16}" for n in names)
        print(f"{r:<12}{cells}{results[names[0]].get(r, {}).get('n', ''):>7}", file=file)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=Path("out/shapes"), help="LLaMA-VID checkpoint directory")
    p.add_argument("--questions", type=Path, default=Path("out/shapes_data/val.json"),
                   help="LLaVA-format JSON (conversations) or .jsonl of LLaVA eval questions")
    p.add_argument("--media-folder", type=Path, default=None,
                   help="where the questions' video / image paths start (default: the question file's folder)")
    p.add_argument("--benchmark", default="shapes", choices=sorted(SCORERS), help="the scorer")
    p.add_argument("--answers", type=Path, default=None,
                   help="answers .jsonl (default: <model-path>/answers_<questions>.jsonl); reruns continue it")
    p.add_argument("--results", type=Path, default=None,
                   help="figures as JSON (default: <model-path>/results_<questions>.json)")
    p.add_argument("--zero-context", action="store_true",
                   help="also answer with every frame's context token zeroed, and print both")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--vision-path", type=Path, default=None)
    p.add_argument("--bert-path", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    from data import Tokenizer
    from model import LlamaVID
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_questions(args.questions)  # a bad question file fails before the model loads
    folder = args.media_folder or args.questions.parent
    model = LlamaVID.from_pretrained(args.model_path, vision_path=args.vision_path, bert_path=args.bert_path,
                                     device=args.device)
    tokenizer = Tokenizer(args.model_path)
    mid = model_id(args.model_path)
    answers = args.answers or args.model_path / f"answers_{args.questions.stem}.jsonl"
    runs = {"normal": (answers, contextlib.nullcontext())}
    if args.zero_context:
        runs["zero-context"] = (answers.with_name(answers.stem + "_zero_context.jsonl"), zero_context(model))
    results = {}
    for name, (path, hook) in runs.items():
        t0 = time.time()
        with hook:
            records = answer_questions(model, tokenizer, questions, path, folder, mid, args.batch_size,
                                       args.max_new_tokens, args.fps, args.max_frames)
        if any(r["answer"] is None for r in records):
            raise ValueError(f"{args.questions} has questions without a reference answer: nothing to score")
        results[name] = SCORERS[args.benchmark](records)
        print(f"{name}: {len(records)} answers in {path} ({time.time() - t0:.0f} s)", file=sys.stderr)
    print_table(results)
    out = args.results or args.model_path / f"results_{args.questions.stem}.json"
    out.write_text(json.dumps({"model": str(args.model_path), "model_id": mid, "questions": str(args.questions),
                               "benchmark": args.benchmark, "results": results}, indent=2))
    print(f"figures in {out}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
