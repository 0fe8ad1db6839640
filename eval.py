r"""Evaluate a LLaMA-VID checkpoint on a benchmark (benchmarks.py): answer every question (batched, greedy decoding),
append each answer to a .jsonl as it comes (a rerun skips what is answered), then score the answers by the
benchmark's rules, print a table and save the figures as JSON.

python eval.py --zero-context     (the quick start: out/shapes on out/shapes_data/val.json, also with context zeroed)
python eval.py --model-path out/shapes --questions out/shapes_data/val.json --media-folder out/shapes_data
python eval.py --benchmark pope --model-path DIR --questions llava_pope_test.jsonl --image-folder val2014 \
    --annotations pope/coco --answers out/pope.jsonl
python eval.py --benchmark textvqa --score-only --questions llava_textvqa_val_v051_ocr.jsonl \
    --annotations TextVQA_0.5.1_val.json --answers merge.jsonl    (answers of ours or of the original's scripts)
"""
import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import BENCHMARKS, by_id, media_folder
from chat import (DEFAULT_MODEL, ArgumentParser, add_media_args, add_model_args, check_args, human_message,
                  load_model_from_args, prompt_ids, run_command)
from checkpoint import checkpoint_dir, is_hub_id
from media import image_media, video_media

# ----------------------------------------------------------------------------------------------------------
# the model and its inputs


def load_model(args):
    """The model and tokenizer as chat.load_model gives them (--device / --dtype auto: CUDA in bfloat16, then MPS,
    then the CPU in float32; Hub ids, LoRA runs, --quantize)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model_from_args(args)
    return model, tokenizer


def model_id(model_path):
    """Names the weights an answer came from: a rerun with other weights does not reuse old answers."""
    files = sorted(p for p in Path(model_path).iterdir() if p.suffix in (".safetensors", ".bin"))
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{Path(model_path).name}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def zero_context(model):
    """Inside this block every frame's context token (the first of its 1 + n visual tokens, made by the
    question-guided Q-Former) is zero, so the model answers from the content tokens alone."""
    model.visual.zero_context = True
    try:
        yield model
    finally:
        model.visual.zero_context = False


def load_media(question, folder, model, fps, max_frames):
    """A question's image or video as the model takes it (model.Media), or None for a text question."""
    if "video" in question:
        return video_media(Path(folder) / question["video"], model.image_size, fps, max_frames)
    if "image" in question:
        # a question may opt out of padding: ScienceQA's original script runs the bare image processor
        return image_media(Path(folder) / question["image"], model.image_size,
                           model.pads_images and question.get("pad", True))
    return None


# ----------------------------------------------------------------------------------------------------------
# answers: written as they come, matched to their questions as the original's scripts match them


def read_answers(path, mid=None):
    """The answer records of a .jsonl, in file order. mid: only those these weights wrote (a file holding others
    is moved aside, whole, and this one rewritten with them alone, so a rerun with other weights answers afresh
    and nothing is lost); None: all, the file must exist."""
    path = Path(path)
    if not path.is_file():
        if mid is not None:
            return []
        raise FileNotFoundError(f"answers file {path} does not exist (run without --score-only to make it)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"answers file {path}, line {n + 1}, is not JSON ({e})") from None
            if not isinstance(records[-1], dict):
                raise ValueError(f"answers file {path}, line {n + 1}, is not a JSON object")
    if mid is None:
        if len({r.get("model_id") for r in records}) > 1:
            print(f"warning: {path} holds answers of several weights", file=sys.stderr)
        return records
    kept = [r for r in records if r.get("model_id") == mid]
    if len(kept) != len(records):  # other weights' answers (or the original's file): kept aside, never lost
        aside = path.with_name(f"{path.stem}.before-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
        path.replace(aside)
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        print(f"{path}: {len(records) - len(kept)} answer(s) of other weights moved aside with the rest to {aside}",
              file=sys.stderr)
    return kept


def match_answers(questions, records, key=by_id):
    """Pair answer records with questions as the original's scripts do: by key(question_id, prompt), and where
    several questions share a key (the two MME questions of an image, LLaVA's TextVQA questions under their
    image's id) the k-th answer of that key, in file order, answers the k-th such question. An answer to a
    question already answered replaces the earlier one, as the original's dicts of answers keep the last.
    Returns the record of each question (None: unanswered), the records that match no question, and the
    records replaced."""
    slots = {}
    for i, q in enumerate(questions):
        slots.setdefault(key(q["question_id"], q["question"]), []).append(i)
    placed, taken, extra, replaced = [None] * len(questions), {}, [], []
    for r in records:
        k = key(r["question_id"], r.get("prompt"))
        if k not in slots:
            extra.append(r)
            continue
        n = taken.get(k, 0)
        i = slots[k][min(n, len(slots[k]) - 1)]
        if placed[i] is not None:
            replaced.append(placed[i])
        placed[i], taken[k] = r, n + 1
    return placed, extra, replaced


@torch.no_grad()
def answer_questions(model, tokenizer, questions, answers_path, folder, mid, batch_size=16,
                     max_new_tokens=32, fps=1.0, max_frames=None, key=by_id):
    """Answer the questions not yet answered in answers_path (matched as match_answers does), batch by batch,
    greedily; every batch's answers are appended (and flushed) before the next starts. A record carries the
    question's id as its file spells it, repeats included, so the original's scorers read the file too."""
    placed, _, _ = match_answers(questions, read_answers(answers_path, mid), key)
    todo = [i for i, r in enumerate(placed) if r is None]
    dev = model.llm.tok_embeddings.weight.device
    Path(answers_path).parent.mkdir(parents=True, exist_ok=True)
    with open(answers_path, "a", encoding="utf-8") as f, tqdm(total=len(questions), initial=len(questions) - len(todo),
                                                              desc=f"answering ({Path(answers_path).name})",
                                                              file=sys.stderr) as bar:
        for start in range(0, len(todo), batch_size):
            batch = [questions[i] for i in todo[start:start + batch_size]]
            ids, media = [], []
            for q in batch:
                media.append(load_media(q, folder, model, fps, max_frames))
                ids.append(torch.tensor(prompt_ids(tokenizer, [("USER", human_message(q["question"], media[-1]))]),
                                        device=dev))
            guides = [[q.get("guide", q["question"])] for q in batch]  # MMBench's: without the letter suffix
            new = model.generate(ids, media, guides, max_new_tokens=max_new_tokens,
                                 temperature=0.0, eos_id=tokenizer.eos_id)
            for q, row in zip(batch, new.tolist()):
                row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
                f.write(json.dumps({"question_id": q["question_id"], "prompt": q["question"],
                                    "text": tokenizer.decode(row).strip(), "answer": q.get("answer"),
                                    "type": q.get("type"), "model_id": mid}) + "\n")
            f.flush()
            bar.update(len(batch))


def place_answers(bench, questions, path, args):
    """The questions with their answers from the answers file ("text", None where unanswered), and how many
    are answered. An answer that matches no question, or a question left unanswered, stops the run unless
    --allow-partial."""
    records = read_answers(path)
    if bench.from_original is not None:
        records = bench.from_original(records, questions)
    for n, r in enumerate(records):
        if "question_id" not in r or not isinstance(r.get("text"), str):
            raise ValueError(f"answers file {path}: answer {n + 1} lacks 'question_id' or 'text' (a line as "
                             "model_vqa_loader.py writes it, or the original's video prediction line)")
    placed, extra, replaced = match_answers(questions, records, bench.key)
    answered = sum(r is not None for r in placed)
    if (extra or replaced or answered < len(questions)) and not args.allow_partial:
        first = f" (the first: question_id {extra[0]['question_id']})" if extra else ""
        raise ValueError(f"{path}: of its {len(records)} answers {len(extra)} match no question of {args.questions}"
                         f"{first} and {len(replaced)} repeat an answered one, and {len(questions) - answered} of "
                         f"{len(questions)} questions have no answer; give the answers to this question file, or "
                         "--allow-partial to score what matches (a repeated answer replaces the earlier)")
    if bench.by_position:
        line = {id(r): n for n, r in enumerate(records)}
        order = [line[id(r)] for r in placed if r is not None]
        if any(a > b for a, b in zip(order, order[1:])) or answered < len(questions):
            print(f"warning: {path} does not hold every answer in question order; the original's {args.benchmark} "
                  "scorer pairs answers with the ground truth by position, so its figures may differ", file=sys.stderr)
    return [{**q, "text": None if r is None else r["text"]} for q, r in zip(questions, placed)], answered


# ----------------------------------------------------------------------------------------------------------
# the figures


def print_table(results):
    """Every run's figures in one table: a row per scorer row, a column per metric and run ("normal",
    "zero-context"); the runs answer the same questions, so the count n has one column."""
    runs = list(results)
    rows = list(dict.fromkeys(r for res in results.values() for r in res))
    metrics = list(dict.fromkeys(m for res in results.values() for row in res.values() for m in row))
    columns = [(run, m) for m in metrics for run in (runs[:1] if m == "n" else runs)]
    heads = [m if len(runs) == 1 or m == "n" else f"{run} {m}" for run, m in columns]
    widths = [max(12, len(h) + 2) for h in heads]
    first = max([12] + [len(r) + 2 for r in rows])
    print(f"{'':<{first}}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    for r in rows:
        cells = [results[run].get(r, {}).get(m) for run, m in columns]
        print(f"{r:<{first}}" + "".join(f"{'-':>{w}}" if v is None else f"{v:>{w}}" if isinstance(v, int)
                                        else f"{v:>{w}.2f}" for v, w in zip(cells, widths)))


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="shapes", choices=list(BENCHMARKS), help="what the questions are scored as")
    p.add_argument("--questions", type=Path, default=Path("out/shapes_data/val.json"),
                   help="the benchmark's question file (shapes: LLaVA-format JSON or a .jsonl of LLaVA eval questions)")
    p.add_argument("--media-folder", "--image-folder", "--video-folder", type=Path, default=None,
                   help="where the questions' video / image paths start (default: the question file's folder)")
    p.add_argument("--answers", type=Path, default=None,
                   help="answers .jsonl; reruns continue it (default: <model-path>/answers_<benchmark>.jsonl, for "
                        "shapes answers_<questions>.jsonl)")
    p.add_argument("--results", "--out-json", type=Path, default=None,
                   help="figures as JSON (default: <answers>_results.json, for shapes "
                        "<model-path>/results_<questions>.json)")
    p.add_argument("--zero-context", action="store_true",
                   help="also answer with every frame's context token zeroed, and print both")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the benchmark's (shapes 32, images 128, multiple choice 1024, videos 512)")
    add_model_args(p)
    add_media_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g = p.add_argument_group("scoring")
    g.add_argument("--annotations", type=Path, default=None,
                   help="the ground truth the benchmark's scorer reads: gqa testdev_balanced_questions.json; mme "
                        "MME_Benchmark_release_version/; pope coco/ (coco_pope_*.json); sqa the folder of "
                        "problems.json + pid_splits.json; textvqa TextVQA_0.5.1_val.json; seed SEED-Bench.json; "
                        "activitynet test_a.json; vqav2 llava_vqav2_mscoco_test2015.jsonl (server file) or an "
                        "official annotation .json (local score); vizwiz an annotation .json (local score)")
    g.add_argument("--score-only", action="store_true", help="score the --answers file; no model is loaded")
    g.add_argument("--allow-partial", action="store_true",
                   help="score the answers that match questions even when some match none or some questions have none")
    g.add_argument("--submission", type=Path, default=None,
                   help="the file for the benchmark's server (default: beside the answers)")
    g.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible base URL (…/v1) of the judge for the video benchmarks; none: no judging")
    g.add_argument("--judge-model", default="gpt-3.5-turbo", help="the judge model (the original's default)")
    g.add_argument("--judge-key", default=None, help="the judge's API key (sent only to --judge-url)")
    g.add_argument("--judge-workers", type=int, default=8, help="judge requests in flight at once")
    g.add_argument("--judge-timeout", type=float, default=120.0, help="seconds to wait for one judge reply")
    args = check_args(p, p.parse_args(argv))
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    args.model_path = args.model_path or str(DEFAULT_MODEL)
    # answers and figures go beside a local checkpoint; a Hub model's go to out/<its name>
    where = Path("out") / args.model_path.rsplit("/", 1)[-1] if is_hub_id(args.model_path) else Path(args.model_path)
    # the quick start's files are named after its question file (<model>/answers_val.jsonl, results_val.json), a
    # paper benchmark's after the benchmark: MSVD-QA and MSRVTT-QA both name theirs test_qa.json
    if args.benchmark == "shapes":
        args.answers = args.answers or where / f"answers_{args.questions.stem}.jsonl"
        args.results = args.results or where / f"results_{args.questions.stem}.json"
    args.answers = args.answers or where / f"answers_{args.benchmark}.jsonl"
    args.results = args.results or args.answers.with_name(args.answers.stem + "_results.json")
    return args


def main(argv=None):
    """Answer the benchmark's questions (resumably), score them by its rules, write the server file where there
    is one, print the table and save every figure as JSON."""
    args = parse_args(argv)
    bench = BENCHMARKS[args.benchmark]
    questions = bench.load(args)  # a bad question or annotation file fails before the model loads
    runs = {"normal": args.answers}
    if args.zero_context:
        runs["zero-context"] = args.answers.with_name(args.answers.stem + "_zero_context.jsonl")
    mid = None
    if not args.score_only:
        model, tokenizer = load_model(args)
        mid = model_id(checkpoint_dir(args.model_path))
        for name, path in runs.items():
            t0 = time.time()
            with zero_context(model) if name == "zero-context" else contextlib.nullcontext():
                answer_questions(model, tokenizer, questions, path, media_folder(args), mid, args.batch_size,
                                 args.max_new_tokens or bench.max_new_tokens, args.fps, args.max_frames, key=bench.key)
            print(f"{name}: {len(questions)} answers in {path} ({time.time() - t0:.0f} s)", file=sys.stderr)
    results, answered = {}, {}
    for name, path in runs.items():
        items, answered[name] = place_answers(bench, questions, path, args)
        results[name] = bench.score(items, args, path)
        if name == "normal" and bench.submit is not None and answered[name]:
            submission = args.submission or args.answers.with_name(f"{args.answers.stem}_{bench.submission}")
            bench.submit(items, args, submission)
            print(f"server file: {submission}")
    for name, n in answered.items():
        if n < len(questions):
            print(f"{name}: PARTIAL, {n} of {len(questions)} questions answered")
    print_table(results)
    args.results.write_text(json.dumps({
        "benchmark": args.benchmark, "model": None if args.score_only else str(args.model_path), "model_id": mid,
        "questions": str(args.questions), "answers": str(args.answers), "n_questions": len(questions),
        "n_answered": answered, "results": results}, indent=2))
    print(f"figures in {args.results}")
    return results


if __name__ == "__main__":
    run_command(lambda: main() is None)  # exit code 0
