"""The paper's benchmarks, each a question loader, a scorer following the original's script, and a server-file
writer where there is one; eval.py runs them (BENCHMARKS), "shapes" (the quick start's clips) among them.

A loader reads the questions in the form their authors publish them and the original's eval scripts read them,
with the prompt suffix the original asks with. A scorer follows the original's scoring script rule for rule: the
published numbers come from those rules, so their oddities are kept, and "ORIGINAL QUIRK" marks each one. The
video benchmarks are graded by a GPT judge behind an OpenAI-compatible URL, as the original's are.
"""
import ast
import base64
import csv
import hashlib
import importlib.util
import json
import re
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from shapes import QUESTION_TYPES, TIME_ORDER_TYPES

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA's short-answer suffix
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."  # its multiple-choice one
LETTER_ANSWER_CN = "请直接回答选项字母。"  # MMBench-CN's (model_vqa_mmbench.py --lang cn)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")  # the original tries these in turn for a video's name

# ----------------------------------------------------------------------------------------------------------
# questions, the keys that match answers to them, the rows of a table


def read_json(path, what, lines=False):
    """A JSON file (lines=True: one JSON value a line), with errors that name the file and what it is for."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON{' lines' if lines else ''} ({e})") from None


def with_suffix(text, suffix):
    """The question as the original asks it. LLaVA's eval files already end with the answer-format line;
    a file without it gets it appended, so both ask the same thing."""
    return text if suffix is None or suffix in text else f"{text}\n{suffix}"


def read_questions(path, suffix=None):
    """The questions of a file as dicts {question_id, question, image | video, answer, type, raw (the item)}.

    A .jsonl of LLaVA eval questions, {"question_id", "text" (or "question"), "image" | "video", "category" |
    "type", "answer"?} a line, read as model_vqa_loader.py reads it: ids may repeat (LLaVA's MME file gives both
    questions of an image the image's id, its TextVQA file every question the id of its image) and are kept as
    the file spells them, so the answers file spells them so too. Or a LLaVA-format JSON list: every human turn
    is one question, the gpt turn after it its reference answer; an item of several turns gives ids
    "<id>_<turn>", its turns asked one at a time. suffix: the answer-format line the benchmark asks with."""
    path = Path(path)
    items = read_json(path, "question file", lines=path.suffix == ".jsonl")
    if not isinstance(items, list):
        raise ValueError(f"{path} must hold a JSON list of questions (LLaVA format) or one question a line (.jsonl)")
    out = []
    for n, item in enumerate(items):
        if isinstance(item, dict) and "conversations" in item:
            conv = item["conversations"]
            humans = [i for i, c in enumerate(conv) if c["from"] == "human"]
            types = item.get("types") or [item.get("type")] * len(humans)
            turns = []
            for turn, i in enumerate(humans):
                qid = str(item.get("id", n)) if len(humans) == 1 else f"{item.get('id', n)}_{turn}"
                answer = conv[i + 1]["value"] if i + 1 < len(conv) else None
                turns.append((qid, conv[i]["value"], answer, types[turn] if turn < len(types) else None))
        elif isinstance(item, dict) and "question_id" in item and ("text" in item or "question" in item):
            turns = [(item["question_id"], item.get("text", item.get("question")), item.get("answer"),
                      item.get("category", item.get("type")))]
        else:
            raise ValueError(f"{path}, question {n + 1}: needs 'question_id' and 'text' (a LLaVA eval question) or "
                             "'conversations' (LLaVA format)")
        media = {k: item[k] for k in ("image", "video") if item.get(k)}
        for qid, text, answer, kind in turns:
            question = with_suffix(text.replace("<image>", "").strip(), suffix)
            out.append({"question_id": qid, "question": question, "answer": answer, "type": kind, "raw": item, **media})
    return out


def need(questions, args, field, annotations=None):
    """Without --annotations a benchmark is scored against what its question file gives: every question must."""
    if any(q.get(field) in (None, "", []) for q in questions):
        raise ValueError(f"{args.questions} has questions without {field!r} to score against"
                         + (f": give --annotations {annotations}" if annotations else ""))
    return questions


def media_folder(args):
    """Where the question file's image / video paths start: --image-folder / --video-folder, else the folder
    of the question file (or the folder given as --questions)."""
    if args.media_folder is not None:
        return Path(args.media_folder)
    return args.questions if args.questions.is_dir() else args.questions.parent


def by_id(question_id, prompt):
    """The key an answer is matched to its question by, for most benchmarks: the question id alone."""
    return (str(question_id),)


def prompt_of(question_id, prompt, script):
    """The prompt of an answer line, where the original's script finds the question: the line's id alone does
    not tell the questions of an image apart."""
    if prompt is None:
        raise ValueError(f"the answer to question_id {question_id} has no 'prompt': {script} needs it to tell the "
                         "questions of an image apart")
    return prompt


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def accuracy(hits):
    """The row of a scorer's table for a list of right / wrong: {"accuracy": % right, "n": how many}."""
    hits = list(hits)
    return {"accuracy": 100 * sum(hits) / len(hits) if hits else 0.0, "n": len(hits)}


# ----------------------------------------------------------------------------------------------------------
# the quick start's shapes clips (shapes.make_shapes_dataset)


def normalize(text):
    """Lower case, single spaces, no surrounding punctuation: 'The red square.' == 'the red square'."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def load_shapes(args):
    """A LLaVA-format question file with reference answers (out/shapes_data/val.json), or a .jsonl of them."""
    return need(read_questions(args.questions), args, "answer")


def score_shapes(items, args, answers_path):
    """Exact match (after normalize) per question type, the time-order types together, and overall."""
    done = [q for q in items if q["text"] is not None]
    groups = {kind: [q for q in done if q["type"] == kind] for kind in QUESTION_TYPES}
    groups.update({"time-order": [q for q in done if q["type"] in TIME_ORDER_TYPES], "overall": done})
    return {name: accuracy(normalize(q["text"]) == normalize(q["answer"]) for q in qs)
            for name, qs in groups.items() if qs}


# ----------------------------------------------------------------------------------------------------------
# VQA answer normalisation and accuracy (m4c_evaluator.py, the EvalAI rules of VQAv2 / TextVQA / VizWiz)

VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # ORIGINAL QUIRK: "none" -> "0"
VQA_ARTICLES = {"a", "an", "the"}
VQA_PUNCTUATION = list(';/[]"{}()=+\\_-><@`,?!')  # not "'", ":", ".", "%", "#", "$", "&" ...
# look-behind meant, look-ahead written: "(?!<=\d)" never fires, so a period goes unless a digit FOLLOWS it
# ("3.5" and ".5" keep theirs, "3." and "e.g." lose them). ORIGINAL QUIRK, kept.
VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
VQA_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")


def _contractions():
    """The EvalAI contraction table: an answer word written without its apostrophe(s) -> the word with them.
    One-apostrophe words lose theirs; words of several lose any one of them (couldnt've and couldn'tve ->
    couldn't've). ORIGINAL QUIRKS kept: the capitalised keys (Im, Ive, Id've, I'dve) never match, answers
    being lower-cased first, and "somebody'd" maps the wrong way round, to "somebodyd"."""
    single = ("ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd "
              "how'll how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've "
              "o'clock oughtn't shan't should've shouldn't somebody'll somebody's someone'd someone'll someone's "
              "something'd something'll that's there'd there're there's they'd they'll they're they've 'twas "
              "wasn't we've weren't what'll what're what's what've when's where'd where's where've who'd who'll "
              "who's who've why'll why're why's won't would've wouldn't y'all you'd you'll you're you've")
    several = ("couldn't've hadn't've he'd've I'd've it'd've mightn't've 'ow's'at she'd've shouldn't've "
               "somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've "
               "y'all'll y'all'd've you'd've")
    table = {word.replace("'", ""): word for word in single.split()}
    for word in several.split():
        for i, c in enumerate(word):
            if c == "'":
                table[word[:i] + word[i + 1:]] = word
    table["somebody'd"] = "somebodyd"
    return table


VQA_CONTRACTIONS = _contractions()


def vqa_normalize(answer):
    """An answer as the VQA / TextVQA / VizWiz evaluation compares it (EvalAIAnswerProcessor)."""
    text = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # a punctuation mark touching a space is dropped, else it becomes a space ("hello-world" -> "hello world",
    # "well - done" -> "well done"); the digit-comma test can never fire, commas being gone already
    out = text
    for p in VQA_PUNCTUATION:
        touching = p + " " in text or " " + p in text or VQA_DIGIT_COMMA.search(text) is not None
        out = out.replace(p, "" if touching else " ")
    # ORIGINAL QUIRK: the script passes re.UNICODE (= 32) where sub() takes its count: at most 32 periods go
    out = VQA_PERIOD.sub("", out, count=32)
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_accuracy(prediction, answers):
    """VQA accuracy of one answer against the 10 human answers: for each human left out in turn,
    min(1, matches among the other 9 / 3), averaged; so 1, 2, 3, 4+ matching humans give 0.3, 0.6, 0.9, 1."""
    if len(answers) != 10:
        raise ValueError(f"VQA accuracy needs the 10 human answers of a question, got {len(answers)}")
    humans = [vqa_normalize(a) for a in answers]
    pred = vqa_normalize(prediction)
    return mean(min(1.0, sum(h == pred for j, h in enumerate(humans) if j != i) / 3) for i in range(10))


def human_answers(answers):
    """VQA-style answers as plain strings: VQAv2 / VizWiz store {"answer": ...} dicts, TextVQA strings."""
    return [a["answer"] if isinstance(a, dict) else a for a in answers]


def score_vqa_style(items, args, answers_path):
    """Mean VQA accuracy (%) of the answered questions that carry their 10 human answers ("answers")."""
    done = [q for q in items if q["text"] is not None and q.get("answers")]
    row = {"n": sum(q["text"] is not None for q in items)}
    if done:
        row["accuracy"] = 100 * mean(vqa_accuracy(q["text"], q["answers"]) for q in done)
    return {"overall": row}


def load_textvqa(args):
    """LLaVA's llava_textvqa_val_v051_ocr.jsonl; --annotations TextVQA_0.5.1_val.json gives the 10 human
    answers, matched as eval_textvqa.py does: by (image id, lower-cased question parsed from the prompt)."""
    qs = read_questions(args.questions, SHORT_ANSWER)
    if args.annotations is None:
        for q in qs:
            q["answers"] = q["raw"].get("answers")
        return need(qs, args, "answers", "TextVQA_0.5.1_val.json")
    data = read_json(args.annotations, "TextVQA annotation file")
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"{args.annotations} is not TextVQA's annotation file (a JSON object with 'data')")
    by_key = {(str(a["image_id"]), a["question"].lower()): a["answers"] for a in data["data"]}
    for q in qs:
        key = textvqa_key(q["question_id"], q["question"])  # LLaVA's question_id is the image's id
        if key not in by_key:
            raise ValueError(f"{args.annotations} has no question {key[1]!r} on image {key[0]}: give the "
                             "annotation file of the question file's split")
        q["answers"] = by_key[key]
    return qs


def textvqa_key(question_id, prompt):
    """eval_textvqa.py reads each answer line on its own: its question_id (the image's) and the question it parses
    out of its prompt find the annotation, so that pair is what matches an answer to its question."""
    return str(question_id), textvqa_question(prompt_of(question_id, prompt, "eval_textvqa.py"))


def textvqa_question(prompt):
    """The question inside a TextVQA prompt, lower-cased (eval_textvqa.py's prompt_processor)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ValueError(f"TextVQA prompt {prompt[:60]!r}... has no 'Question: ... Short answer:'")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"TextVQA prompt {prompt[:60]!r}... is of none of the forms eval_textvqa.py reads")
    return question.lower()


def load_vqav2(args):
    """LLaVA's llava_vqav2_mscoco_test-dev2015.jsonl. --annotations: either the full test split
    (llava_vqav2_mscoco_test2015.jsonl), which the server file must cover, or, to score locally on a split
    with answers, the official annotation JSON (v2_mscoco_val2014_annotations.json)."""
    qs = read_questions(args.questions, SHORT_ANSWER)
    if args.annotations is not None and Path(args.annotations).suffix != ".jsonl":
        ann = read_json(args.annotations, "VQAv2 annotation file")
        answers = {str(a["question_id"]): human_answers(a["answers"]) for a in ann.get("annotations", [])}
        for q in qs:
            q["answers"] = answers.get(str(q["question_id"]))
    return qs


def submit_vqav2(items, args, path):
    """convert_vqav2_for_submission.py: every question of the full test split, answered ones normalised,
    the rest (those outside test-dev) with an empty answer."""
    test = args.annotations if args.annotations is not None and Path(args.annotations).suffix == ".jsonl" \
        else args.questions
    split = read_json(test, "VQAv2 test split", lines=True)
    answered = {str(q["question_id"]): q["text"] for q in items if q["text"] is not None}
    out = [{"question_id": row["question_id"], "answer": vqa_normalize(answered[str(row["question_id"])])
            if str(row["question_id"]) in answered else ""} for row in split]
    path.write_text(json.dumps(out))


def load_vizwiz(args):
    """LLaVA's vizwiz llava_test.jsonl; an optional --annotations (VizWiz val.json: image, answers) scores
    locally, the test split goes to the server."""
    qs = read_questions(args.questions, SHORT_ANSWER)
    if args.annotations is not None:
        by_image = {a["image"]: human_answers(a["answers"])
                    for a in read_json(args.annotations, "VizWiz annotation file")}
        for q in qs:
            q["answers"] = by_image.get(q.get("image"))
    return qs


def submit_vizwiz(items, args, path):
    """convert_vizwiz_for_submission.py: [{"image", "answer" (normalised)}] in question order."""
    missing = sum(q["text"] is None for q in items)
    if missing:  # the original refuses (assert); we write what there is and say so
        print(f"warning: {missing} VizWiz question(s) unanswered: the server wants them all", file=sys.stderr)
    path.write_text(json.dumps([{"image": q["raw"]["image"], "answer": vqa_normalize(q["text"])}
                                for q in items if q["text"] is not None]))


# ----------------------------------------------------------------------------------------------------------
# GQA (convert_gqa_for_eval.py + GQA's eval.py on testdev_balanced)

def load_gqa(args):
    """LLaVA's llava_gqa_testdev_balanced.jsonl; --annotations testdev_balanced_questions.json gives the
    answers, the balanced flags and the question types."""
    qs = read_questions(args.questions, SHORT_ANSWER)
    if args.annotations is None:
        return need(qs, args, "answer", "testdev_balanced_questions.json")
    ann = read_json(args.annotations, "GQA question file")
    missing = [q["question_id"] for q in qs if str(q["question_id"]) not in ann]
    if missing:
        raise ValueError(f"{len(missing)} question(s) of {args.questions} are not in {args.annotations} (e.g. "
                         f"{missing[0]}): give the annotation file of the same split")
    for q in qs:
        a = ann[str(q["question_id"])]
        q.update(answer=a["answer"], balanced=a.get("isBalanced", True),
                 structural=a.get("types", {}).get("structural"))
    if len(ann) > len(qs):  # GQA's eval.py would stop on the missing predictions
        print(f"warning: {args.annotations} holds {len(ann) - len(qs)} question(s) not asked", file=sys.stderr)
    return qs


def gqa_answer(text):
    """convert_gqa_for_eval.py's only post-processing: trailing periods off, lower case. ORIGINAL QUIRK kept:
    nothing else, so "Yes, it is." or "the left" never match "yes" / "left"."""
    return text.rstrip(".").lower()


def score_gqa(items, args, answers_path):
    """Exact-match accuracy over the balanced questions; binary (verify, logical, compare, choose) and open
    ('query') questions apart, as GQA's eval.py splits them (where the annotations give the types). GQA's
    eval.py refuses a set with an unanswered balanced question; with --allow-partial we score the answered ones."""
    balanced = [q for q in items if q.get("balanced", True) and q["text"] is not None]
    right = [(q.get("structural"), gqa_answer(q["text"]) == q["answer"]) for q in balanced]
    rows = {"overall": accuracy(ok for _, ok in right)}
    if all(s is not None for s, _ in right):
        for name, test in (("binary", lambda s: s != "query"), ("open", lambda s: s == "query")):
            part = [ok for s, ok in right if test(s)]
            if part:
                rows[name] = accuracy(part)
    return rows


def submit_gqa(items, args, path):
    """The predictions file GQA's eval.py reads: [{"questionId", "prediction"}]."""
    path.write_text(json.dumps([{"questionId": q["question_id"], "prediction": gqa_answer(q["text"])}
                                for q in items if q["text"] is not None]))


# ----------------------------------------------------------------------------------------------------------
# MME (LLaVA's convert_answer_to_mme.py + MME's eval_tool/calculation.py)

MME_TASKS = {
    "perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}


def read_mme_answers(root):
    """{(task, txt file, question): "Yes" / "No"} from MME_Benchmark_release_version: a task folder holds its
    images and their .txt files ("question<TAB>answer" a line), or images/ and questions_answers_YN/."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME folder {root} does not exist (give --annotations MME_Benchmark_release_version)")
    answers = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = task_dir / "questions_answers_YN" if (task_dir / "images").exists() else task_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for line in txt.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise ValueError(f"{txt}: line {line[:60]!r} is not 'question<TAB>answer'")
                answers[(task_dir.name, txt.name, parts[0])] = parts[1]
    return answers


def load_mme(args):
    """LLaVA's llava_mme.jsonl (ids '<task>/<image>', both questions of an image under one id); the answers
    come from --annotations MME_Benchmark_release_version, looked up as convert_answer_to_mme.py does."""
    qs = read_questions(args.questions, SHORT_ANSWER)
    for q in qs:
        q["type"] = str(q["question_id"]).split("/")[0]
    if args.annotations is None:
        return need(qs, args, "answer", "MME_Benchmark_release_version")
    truth = read_mme_answers(args.annotations)
    for q in qs:
        # ORIGINAL QUIRK: the .txt is named after the image name up to its FIRST dot
        task, txt = q["type"], str(q["question_id"]).split("/")[-1].split(".")[0] + ".txt"
        prompt = mme_prompt(q["question"])
        if (task, txt, prompt) not in truth:  # some official questions have two spaces before the request
            prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
        if (task, txt, prompt) not in truth:
            raise ValueError(f"{args.annotations} has no answer for {task}/{txt}: {prompt!r}")
        q["answer"] = truth[(task, txt, prompt)]
    return qs


def mme_prompt(text):
    """A question as convert_answer_to_mme.py looks it up in MME's .txt files: without the short-answer
    suffix, with ' Please answer yes or no.' at the end."""
    text = text.replace("<image>", "").replace(SHORT_ANSWER, "").strip()
    return text if "Please answer yes or no." in text else text + " Please answer yes or no."


def mme_key(question_id, prompt):
    """convert_answer_to_mme.py reads each answer line on its own: the task and image from its question_id
    (both questions of an image share it), the question from its prompt; that pair matches an answer."""
    return str(question_id), mme_prompt(prompt_of(question_id, prompt, "convert_answer_to_mme.py"))


def mme_answer(text):
    """calculation.py's reading of an answer: lower-cased, exactly "yes" / "no", else whichever of "yes"
    (tested first) and "no" occurs in its first 4 characters, else "other" (wrong). ORIGINAL QUIRK: so
    "Not sure" and "Snow" read as "no", "The answer is yes" as "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def score_mme(items, args, answers_path):
    """Per task: acc over its questions, acc+ over its images (both questions right), score =
    100 * (acc + acc+); perception and cognition are the sums of their tasks' scores."""
    rows, totals = {}, {}
    for part, tasks in MME_TASKS.items():
        for task in tasks:
            qs = [q for q in items if q["type"] == task]
            # calculation.py takes a task's lines two by two in file order, one image a pair
            pairs = [qs[i:i + 2] for i in range(0, len(qs), 2)]
            for pair in pairs:
                if len(pair) != 2 or pair[0]["question_id"] != pair[1]["question_id"]:
                    raise ValueError(f"MME task {task}: questions must come two per image, one after the other "
                                     f"(see {pair[0]['question_id']})")
            pairs = [p for p in pairs if all(q["text"] is not None for q in p)]  # unanswered images: skipped
            if not pairs:
                continue
            right = [[mme_answer(q["text"]) == q["answer"].lower() for q in p] for p in pairs]
            acc, acc_plus = 100 * mean(ok for r in right for ok in r), 100 * mean(all(r) for r in right)
            rows[task] = {"acc": acc, "acc+": acc_plus, "score": acc + acc_plus, "n": 2 * len(pairs)}
            totals.setdefault(part, {"score": 0.0, "n": 0})
            totals[part]["score"] += acc + acc_plus
            totals[part]["n"] += 2 * len(pairs)
    return {**rows, **totals}


# ----------------------------------------------------------------------------------------------------------
# POPE (eval_pope.py)

def load_pope(args):
    """LLaVA's llava_pope_test.jsonl ("category": adversarial / popular / random); the labels come from
    --annotations, POPE's coco/ folder of coco_pope_<split>.json files (one {"label"} a line)."""
    qs = read_questions(args.questions, SHORT_ANSWER)
    if args.annotations is None:
        for q in qs:
            q["answer"] = q["raw"].get("label", q["answer"])
        return need(qs, args, "answer", "POPE's coco/ folder of coco_pope_*.json")
    files = sorted(Path(args.annotations).glob("coco_pope_*.json"))
    if not files:
        raise FileNotFoundError(f"{args.annotations} holds no coco_pope_<split>.json label files")
    for f in files:
        split = f.name[len("coco_pope_"):-len(".json")]
        labels = read_json(f, "POPE label file", lines=True)
        of_split = [q for q in qs if q["type"] == split]
        # ORIGINAL QUIRK: labels go with the split's answers by position, not by question id
        if of_split and len(labels) != len(of_split):
            raise ValueError(f"{f} has {len(labels)} labels for the {len(of_split)} {split} questions of "
                             f"{args.questions}: POPE matches them by position, so they must be the same set")
        for q, label in zip(of_split, labels):
            q["answer"] = label["label"]
    splits = {f.name[len("coco_pope_"):-len(".json")] for f in files}
    unlabelled = sorted({str(q["type"]) for q in qs if q["type"] not in splits})
    if unlabelled:
        raise ValueError(f"{args.annotations} has no labels for the splits {unlabelled}")
    return qs


def pope_answer(text):
    """eval_pope.py's reading: only the text before the first "." counts, commas dropped; "no" when a
    space-separated word is exactly "No", "no" or "not", else "yes". ORIGINAL QUIRK: so "Not really" and
    "NO" read as "yes", "There is no dog" as "no"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def score_pope(items, args, answers_path):
    """Accuracy, precision, recall, F1 of "yes" and the share of "yes" answers (%), per split, and their
    average over the splits (the figure papers quote). A label other than "no" counts as "yes", as in the
    original; where precision or recall is 0/0 (no "yes" answers, or no "yes" labels) we give 0, where the
    original stops with ZeroDivisionError."""
    rows = {}
    for split in sorted({q["type"] for q in items}, key=str):
        done = [q for q in items if q["type"] == split and q["text"] is not None]
        if not done:
            continue
        pred = [pope_answer(q["text"]) == "yes" for q in done]
        gold = [q["answer"] != "no" for q in done]
        tp = sum(p and g for p, g in zip(pred, gold))
        fp = sum(p and not g for p, g in zip(pred, gold))
        tn = sum(not p and not g for p, g in zip(pred, gold))
        fn = len(done) - tp - fp - tn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows[str(split)] = {"accuracy": 100 * (tp + tn) / len(done), "precision": 100 * precision,
                            "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": 100 * mean(pred), "n": len(done)}
    if len(rows) > 1:
        splits = list(rows.values())
        rows["average"] = {m: mean(r[m] for r in splits) for m in splits[0] if m != "n"}
        rows["average"]["n"] = sum(r["n"] for r in splits)
    return rows


# ----------------------------------------------------------------------------------------------------------
# ScienceQA-IMG (model_vqa_science.py --single-pred-prompt + eval_science_qa.py)

SQA_OPTIONS = ["A", "B", "C", "D", "E"]


def load_sqa(args):
    """LLaVA's llava_test_CQM-A.json (LLaVA conversations); asked with the letter suffix, images NOT padded
    to square (model_vqa_science.py runs the bare image processor). --annotations: ScienceQA's data folder
    with problems.json and pid_splits.json (the original's --base-dir)."""
    qs = read_questions(args.questions, LETTER_ANSWER)
    for n, q in enumerate(qs):
        if "id" not in q["raw"]:
            raise ValueError(f"{args.questions}, question {n + 1}: needs the 'id' of its ScienceQA problem")
        q["pad"] = False
    if args.annotations is not None:
        read_sqa_annotations(args)  # fail now, not after answering
        return qs
    return need(qs, args, "answer", "ScienceQA's folder with problems.json and pid_splits.json")


def read_sqa_annotations(args):
    """(problems, ids of the test split) from --annotations (the folder, or its problems.json)."""
    folder = Path(args.annotations)
    folder = folder.parent if folder.is_file() else folder
    problems = read_json(folder / "problems.json", "ScienceQA problems file")
    split = read_json(folder / "pid_splits.json", "ScienceQA split file")["test"]
    return problems, split


def sqa_letter(text):
    """eval_science_qa.py's parse: the text itself if it is a letter, "X. ..." -> X, else the one match of
    'The answer is ([A-Z]).'. ORIGINAL QUIRKS: the regex's "." is any character (so "The answer is A"
    at the very end fails), two matches count as none, and "A." (too short for "X. ") is unparsable."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def score_sqa(items, args, answers_path):
    """Accuracy over the test split's problems (an unanswered or unparsable one is wrong; a letter past the
    problem's choices too) and over those with an image (IMG, the paper's figure)."""
    by_pid = {str(q["question_id"]): q for q in items}
    if args.annotations is not None:
        problems, split = read_sqa_annotations(args)
        truth = {pid: (len(problems[pid]["choices"]), problems[pid]["answer"]) for pid in split}
    else:  # the reference answers of the question file; choices counted from its "(A) ... (B) ..." options
        truth = {pid: (len(re.findall(r"\([A-E]\) ", q["question"])), SQA_OPTIONS.index(sqa_letter(q["answer"]))
                       if sqa_letter(q["answer"]) in SQA_OPTIONS else -2) for pid, q in by_pid.items()}
    correct, img = [], []
    for pid, (n_choices, answer) in truth.items():
        q = by_pid.get(pid)
        letter = sqa_letter(q["text"]) if q is not None and q["text"] is not None else "FAILED"
        ok = letter in SQA_OPTIONS[:n_choices] and SQA_OPTIONS.index(letter) == answer
        correct.append(ok)
        # ORIGINAL QUIRK: a problem without an answer counts in the total but not in IMG (its stand-in prompt
        # 'Unknown' has no <image>)
        if q is not None and q["text"] is not None and "image" in q:
            img.append(ok)
    return {"overall": accuracy(correct), "IMG": accuracy(img)}


# ----------------------------------------------------------------------------------------------------------
# SEED-Bench (convert_seed_for_submission.py)

def load_seed(args):
    """LLaVA's llava-seed-bench.jsonl (video questions asked on their middle frame); --annotations
    SEED-Bench.json gives answers, question types and image / video."""
    qs = read_questions(args.questions, LETTER_ANSWER)
    if args.annotations is None:
        return need(qs, args, "answer", "SEED-Bench.json")
    ann = read_json(args.annotations, "SEED-Bench annotation file")
    type_name = {v: k for k, v in ann.get("question_type", {}).items()}
    by_qid = {str(a["question_id"]): a for a in ann.get("questions", [])}
    for q in qs:
        a = by_qid.get(str(q["question_id"]))
        if a is None:
            raise ValueError(f"{args.annotations} has no question {q['question_id']}")
        q.update(answer=a["answer"], data_type=a.get("data_type"), seed_id=a["question_id"],
                 type=type_name.get(a.get("question_type_id"), a.get("question_type_id")))
    return qs


def score_seed(items, args, answers_path):
    """Exact match of the answer text with the letter (so "A." is wrong: ORIGINAL QUIRK); an unanswered
    question is wrong. Per question type, image (the paper's SEED^I), video, overall."""
    ok = {q["question_id"]: q["text"] == q["answer"] for q in items}  # None == "A" is False: unanswered is wrong
    groups = {str(t): [q for q in items if q["type"] == t]
              for t in sorted({q["type"] for q in items if q["type"] is not None}, key=str)}
    groups.update({kind: [q for q in items if q.get("data_type") == kind] for kind in ("image", "video")})
    rows = {name: accuracy(ok[q["question_id"]] for q in qs) for name, qs in groups.items() if qs}
    rows["overall"] = accuracy(ok.values())
    return rows


def submit_seed(items, args, path):
    """The upload file: {"question_id", "prediction"} a line, the id as SEED-Bench.json spells it (a string,
    where LLaVA's question file has a number)."""
    lines = [{"question_id": q.get("seed_id", q["question_id"]), "prediction": q["text"]}
             for q in items if q["text"] is not None]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


# ----------------------------------------------------------------------------------------------------------
# MMBench / MMBench-CN (model_vqa_mmbench.py --single-pred-prompt + convert_mmbench_for_submission.py)

# pandas' read_table turns these cell texts into NaN; the original then treats the cell as empty
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
MMBENCH_DROPPED = ["hint", "category", "source", "image", "comment", "l2-category"]


def mmbench_empty(value):
    """model_vqa_mmbench.py's is_none on a cell as pandas reads it. ORIGINAL QUIRK: an option whose text is
    "None" (or "NA", "nan", ...) counts as absent and ends the option list."""
    return value is None or value in PANDAS_NA or value.lower() in ("nan", "none")


def read_tsv(path):
    """(header, rows as dicts) of a TSV with pandas' quoting rules (MMBench stores images as base64 cells)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMBench file {path} does not exist")
    csv.field_size_limit(2 ** 31 - 1)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        rows = [dict(zip(header, row)) for row in reader if row]
    if not header or not {"index", "question", "image"} <= set(header):
        raise ValueError(f"{path} is not an MMBench TSV (needs columns index, question, image, A, B, ...)")
    return header, rows


def load_mmbench(args, suffix=LETTER_ANSWER):
    """An MMBench TSV (mmbench_dev_20230712.tsv, mmbench_dev_cn_20231003.tsv); every question asked once
    (no --all-rounds, as the original's scripts run it). The Q-Former is guided by the question without
    the letter suffix, which goes to the LLM only. Images are decoded once into <answers>_images/."""
    if importlib.util.find_spec("openpyxl") is None:  # its server file is an .xlsx: say so before answering
        raise ValueError("--benchmark mmbench writes the server's .xlsx with openpyxl: pip install openpyxl")
    header, rows = read_tsv(args.questions)
    folder = args.answers.parent / f"{args.answers.stem}_images"
    if not args.score_only:
        folder.mkdir(parents=True, exist_ok=True)
    qs = []
    for row in rows:
        options = []
        for letter in "ABCD":
            if mmbench_empty(row.get(letter)):
                break
            options.append((letter, row[letter]))
        question = row["question"] if mmbench_empty(row.get("hint")) else f"{row['hint']}\n{row['question']}"
        question += "".join(f"\n{letter}. {option}" for letter, option in options)
        data = base64.b64decode(row["image"])
        image = folder / (str(row["index"]) + (".png" if data[:4] == b"\x89PNG" else ".jpg"))
        if not image.is_file() and not args.score_only:
            image.write_bytes(data)
        qs.append({"question_id": str(row["index"]), "question": f"{question}\n{suffix}", "guide": question,
                   "image": str(image.resolve()), "type": row.get("category"), "options": [o for o, _ in options],
                   "answer": None if mmbench_empty(row.get("answer")) else row["answer"],
                   "raw": {k: v for k, v in row.items() if k != "image"}, "header": header})
    return qs


def score_mmbench(items, args, answers_path):
    """MMBench is scored by its server (CircularEval over rotated options); as a local companion, on a split
    with answers, the share of first answers that are the right letter (alone or before a non-letter)."""
    row = {"n": sum(q["text"] is not None for q in items)}
    done = [q for q in items if q["text"] is not None and q["answer"] is not None]
    if done:
        row["accuracy_single_pass"] = 100 * mean(
            q["text"][:1] == q["answer"] and (len(q["text"]) == 1 or not q["text"][1].isalnum()) for q in done)
    return {"overall": row}


def submit_mmbench(items, args, path):
    """convert_mmbench_for_submission.py: the TSV less hint, category, source, image, comment, l2-category,
    with a "prediction" column inserted 7th, as an .xlsx (one sheet; the index as a number, every other cell
    as text, an empty or NaN cell left empty, as pandas writes them through openpyxl)."""
    from openpyxl import Workbook  # an optional extra, checked for by load_mmbench
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    header = [c for c in items[0]["header"] if c not in MMBENCH_DROPPED]
    header.insert(min(6, len(header)), "prediction")
    book = Workbook()
    sheet = book.active
    sheet.append(header)
    for q in items:
        row = []
        for c in header:
            value = q["text"] if c == "prediction" else None if mmbench_empty(q["raw"].get(c)) else q["raw"][c]
            if c == "index" and value is not None and re.fullmatch(r"-?\d+", value):
                value = int(value)
            elif isinstance(value, str):
                value = ILLEGAL_CHARACTERS_RE.sub("", value)  # control characters a sheet cannot hold
            row.append(value)
        sheet.append(row)
    book.save(path)


# ----------------------------------------------------------------------------------------------------------
# video QA: MSVD-QA, MSRVTT-QA, ActivityNet-QA (model_msvd_qa.py / model_activitynet_qa.py, asked with the
# bare question; eval_msvd_qa.py / eval_activitynet_qa.py, a GPT judge) and the Video-ChatGPT benchmark
# (model_video_chatgpt_*.py, evaluate_benchmark_1..5_*.py). ORIGINAL QUIRK not kept: the original samples
# answers at temperature 0.2; we decode greedily, so reruns give the same answers.

def find_video(folder, stem):
    """The file of a video named without extension: the first of .mp4, .avi, .mov, .mkv that exists."""
    for ext in VIDEO_SUFFIXES:
        if (folder / f"{stem}{ext}").is_file():
            return f"{stem}{ext}"
    return f"{stem}.mp4"  # none there: answering it names the missing file


def counted_id(counts, name):
    """The judge scripts' item key: '<id>_<k>' for the k-th item (from 0) with that id."""
    k = counts.get(name, 0)
    counts[name] = k + 1
    return f"{name}_{k}"


def load_msvd(args):
    """MSVD-QA / MSRVTT-QA test_qa.json: [{"video_id", "question", "id", "answer"}]."""
    rows, folder, counts, qs = read_json(args.questions, "video QA file"), media_folder(args), {}, []
    for n, row in enumerate(rows):
        if not {"video_id", "question", "id", "answer"} <= set(row):
            raise ValueError(f"{args.questions}, item {n}: needs video_id, question, id, answer (test_qa.json)")
        qs.append({"question_id": counted_id(counts, str(row["id"])), "question": row["question"],
                   "video": find_video(folder, row["video_id"]), "answer": row["answer"]})
    return qs


def load_activitynet(args):
    """ActivityNet-QA test_q.json [{"video_name", "question_id", "question"}] with the answers of
    --annotations test_a.json (default: test_a.json beside it), videos named v_<video_name>."""
    rows = read_json(args.questions, "ActivityNet-QA question file")
    ann = Path(args.annotations) if args.annotations is not None else args.questions.with_name("test_a.json")
    answers = read_json(ann, "ActivityNet-QA answer file (give --annotations test_a.json)")
    # ORIGINAL QUIRK: question i takes answer i, by position, not by question_id
    if len(answers) != len(rows):
        raise ValueError(f"{ann} has {len(answers)} answers for the {len(rows)} questions of {args.questions}")
    folder, counts, qs = media_folder(args), {}, []
    for row, a in zip(rows, answers):
        qs.append({"question_id": counted_id(counts, str(row["question_id"])), "question": row["question"],
                   "video": find_video(folder, f"v_{row['video_name']}"), "answer": a["answer"], "type": a.get("type")})
    return qs


VCG_FILES = {"generic": "generic_qa.json", "temporal": "temporal_qa.json", "consistency": "consistency_qa.json"}


def load_videochatgpt(args):
    """The Video-ChatGPT benchmark: --questions its evaluation folder (generic_qa.json, temporal_qa.json,
    consistency_qa.json) or one of those files. Generic answers are judged for correctness, detail and
    context, temporal ones for temporal understanding, the two answers of a consistency item together."""
    path, folder, qs = args.questions, media_folder(args), []
    files = [(kind, path / name) for kind, name in VCG_FILES.items() if (path / name).is_file()] if path.is_dir() \
        else [(next((k for k in VCG_FILES if k in path.name), "generic"), path)]
    if not files:
        raise FileNotFoundError(f"{path} holds none of {', '.join(VCG_FILES.values())}")
    for kind, file in files:
        counts = {}
        for n, row in enumerate(read_json(file, "Video-ChatGPT question file")):
            keys = ("video_name", "Q1", "Q2", "A") if kind == "consistency" else ("video_name", "Q", "A")
            if not set(keys) <= set(row):
                raise ValueError(f"{file}, item {n}: needs {', '.join(keys)}")
            base = counted_id(counts, f"{kind}/{row['video_name']}")
            q = {"video": find_video(folder, row["video_name"]), "answer": row["A"], "type": kind,
                 "video_name": row["video_name"]}
            if kind == "consistency":
                qs += [{**q, "question_id": f"{base}/{i}", "question": row[f"Q{i}"], "pair": base, "Q1": row["Q1"]}
                       for i in (1, 2)]
            else:
                qs.append({**q, "question_id": base, "question": row["Q"]})
    return qs


def video_key(question_id, prompt):
    """The original's judge scripts take question, reference and answer from each prediction line, never from the
    question file; matching the question too makes sure we judge what they would."""
    return str(question_id), prompt


def from_video_predictions(records, questions):
    """The original's video prediction lines as answer records; ours pass unchanged. model_msvd_qa.py and
    model_activitynet_qa.py write {"id", "question", "answer", "pred"}, and the judge scripts name the k-th line
    of an id '<id>_<k>' (file order); model_video_chatgpt_general.py writes the benchmark's item with "pred",
    model_video_chatgpt_consistency.py with "pred1" and "pred2", named '<video_name>_<k>' within each file.
    A generic and a temporal line look alike: the question tells them apart."""
    temporal = {(q["video_name"], q["question"]) for q in questions if q.get("type") == "temporal"}
    generic = {(q["video_name"], q["question"]) for q in questions if q.get("type") == "generic"}
    counts, out = {}, []
    for r in records:
        if "question_id" in r or "pred" not in r and "pred1" not in r:
            out.append(r)
        elif "id" in r:
            out.append({"question_id": counted_id(counts, str(r["id"])), "prompt": r.get("question"),
                        "text": r["pred"]})
        elif "pred1" in r:
            base = counted_id(counts, f"consistency/{r.get('video_name')}")
            out += [{"question_id": f"{base}/{i}", "prompt": r.get(f"Q{i}"), "text": r.get(f"pred{i}")} for i in (1, 2)]
        else:
            seen = (r.get("video_name"), r.get("Q"))
            kind = "temporal" if seen in temporal and seen not in generic else "generic"
            out.append({"question_id": counted_id(counts, f"{kind}/{r.get('video_name')}"), "prompt": r.get("Q"),
                        "text": r["pred"]})
    return out


# --- the judge

# The judge prompts: the original's instructions and reply format, in our own words (so judged figures can
# differ from the paper's by the judge's sensitivity to wording). The reply is a Python dict literal.
JUDGE_PAIR = ("Grade this video question-answer pair:\n\nQuestion: {question}\nCorrect Answer: {answer}\n"
              "Predicted Answer: {pred}\n\n")
JUDGE_REPLY = ("Write the reply as a Python dictionary string with {keys}. Reply with that dictionary only, no "
               # ORIGINAL QUIRK kept: the example score is 4.8 although an INTEGER is asked for; int() truncates
               "other text or explanation. A reply looks like this: {example}.")
JUDGE_QA = (
    "Your job is to grade answers that a model gave to questions about videos. For each question you get "
    "the correct answer and the model's answer, and you decide whether the model's answer means the same "
    "thing as the correct one.\n##INSTRUCTIONS:\n- Judge agreement in meaning, not in wording.\n"
    "- Synonyms and paraphrases of the correct answer count as agreeing.\n"
    "- Grade how correct the model's answer is with respect to the correct answer.")
JUDGE_CONSISTENCY = (
    "Your job is to grade how consistent a model's answers are across two very similar questions about "
    "one video. You get the two questions, one correct answer that fits both, and the model's answer "
    "to each; decide whether the two answers agree with each other and with the correct answer.\n"
    "##INSTRUCTIONS:\n- Both answers should match the correct answer and each other, with no "
    "contradiction or marked difference in what they say.\n- Both must give the same information "
    "about the video as the correct answer.\n- Synonyms and paraphrases count as agreeing only if the "
    "information stays the same.\n- Grade the consistency of the two answers against the correct answer.")
VCG_ASPECTS = {  # aspect: (quality judged, what the judge compares, its instructions, the name of the score)
    "correctness": ("factual accuracy", "whether the two agree on the facts",
                    "- The model's answer must agree with the correct answer on the facts, with nothing misread "
                    "or false in it.\n- It must be factually right and fit what the video shows.\n"
                    "- Synonyms and paraphrases count as agreeing.\n"
                    "- Grade the factual accuracy of the model's answer against the correct answer.",
                    "factual accuracy"),
    "detail": ("detail orientation", "how detailed the model's answer is, in completeness and in specificity",
               "- Check that the model's answer covers every major point of the video and leaves no key aspect "
               "out.\n- Check that it gives specific details tied to particular elements of the video rather "
               "than generic statements.\n- Synonyms and paraphrases count as agreeing.\n"
               "- Give one score reflecting both completeness and specificity.", "detail orientation"),
    "context": ("contextual understanding", "whether the model's answer fits the overall context of the video",
                "- Check that the model's answer fits the video's overall context and says nothing out of "
                "context or beside the point.\n- It must capture the main themes and the mood of the video.\n"
                "- Synonyms and paraphrases count as agreeing.\n"
                "- Grade how well the model's answer understands the context, against the correct answer.",
                "contextual understanding"),
    "temporal": ("temporal understanding", "whether the model's answer gets the order of events in the video right",
                 "- The model's answer must agree with the correct answer on when things happen: events and "
                 "details must come in the order the video shows them.\n- Synonyms and paraphrases count as "
                 "agreeing only if the order of events is kept.\n"
                 "- Grade the temporal accuracy of the model's answer against the correct answer.",
                 "temporal accuracy"),
}


def score_only_reply(score, best):
    """The reply asked of the Video-ChatGPT judges: one integer score."""
    keys = f"the key 'score', whose value is the {score} score as an INTEGER, not a STRING"
    return (f"Reply with a {score} score only: an integer from 0 to 5, 5 meaning {best}. "
            + JUDGE_REPLY.format(keys=keys, example="{'score': 4.8}"))


def qa_judge_messages(question, answer, pred):
    user = (JUDGE_PAIR.format(question=question, answer=answer, pred=pred) + "Reply with a verdict, yes or no, and "
            "a score: an integer from 0 to 5, 5 meaning the answers agree best. " + JUDGE_REPLY.format(
                keys="the keys 'pred' (the string 'yes' or 'no') and 'score' (an INTEGER, not a STRING)",
                example="{'pred': 'yes', 'score': 4.8}"))
    return [{"role": "system", "content": JUDGE_QA}, {"role": "user", "content": user}]


def vcg_judge_messages(aspect, question, answer, pred):
    quality, compare, bullets, score = VCG_ASPECTS[aspect]
    system = (f"Your job is to grade answers that a model gave to questions about videos, for their {quality}. "
              f"Compare the model's answer with the correct answer and decide {compare}.\n##INSTRUCTIONS:\n{bullets}")
    user = (JUDGE_PAIR.format(question=question, answer=answer, pred=pred)
            + score_only_reply(score, f"the best {quality}"))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def consistency_judge_messages(question1, question2, answer, pred1, pred2):
    user = (f"Grade these video question-answer pairs:\n\nQuestion 1: {question1}\nQuestion 2: {question2}\n"
            f"Correct Answer: {answer}\nPredicted Answer to Question 1: {pred1}\nPredicted Answer to Question 2: "
            f"{pred2}\n\n" + score_only_reply("consistency", "the most consistent"))
    return [{"role": "system", "content": JUDGE_CONSISTENCY}, {"role": "user", "content": user}]


def parse_judgement(reply, need_pred):
    """{'score': int, 'pred'?: str} from a judge's reply, or None. The original runs ast.literal_eval on the
    whole reply and asks again on failure; we also try any {...} inside it (a reply wrapped in prose or a
    code fence). ORIGINAL QUIRK kept: int() truncates, so a score of 4.8 counts 4."""
    text = str(reply).strip()
    for candidate in [text] + re.findall(r"\{[^{}]*\}", text):
        try:
            verdict = ast.literal_eval(candidate)
            score = int(float(verdict["score"]))
        except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError):
            continue
        pred = verdict.get("pred", verdict.get("predicted"))  # eval_msvd_qa.py also takes 'predicted'
        if need_pred and not isinstance(pred, str):
            continue
        return {"score": score, "pred": pred} if need_pred else {"score": score}
    return None


JUDGE_TRIES = 3


def ask_judge(args, messages, need_pred):
    """POST one chat to the OpenAI-compatible --judge-url; (reply text, verdict or None). Network errors are
    retried with a pause, unparsable replies asked again at once (the original retries forever)."""
    url = args.judge_url.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if args.judge_key:
        headers["Authorization"] = f"Bearer {args.judge_key}"
    body = json.dumps({"model": args.judge_model, "messages": messages}).encode()
    reply = None
    for attempt in range(JUDGE_TRIES):
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=args.judge_timeout) as response:
                reply = json.loads(response.read())["choices"][0]["message"]["content"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # URLError, HTTPError are OSErrors
            reply = f"(no reply: {e})"
            time.sleep(min(2 ** attempt, 10))
            continue
        verdict = parse_judgement(reply, need_pred)
        if verdict is not None:
            return reply, verdict
    return reply, None


def run_judge(jobs, args, answers_path):
    """Judge every job {name: (messages, need_pred)}; returns {name: verdict} of those judged, now or by an
    earlier run. Verdicts are cached in <answers>_judge.jsonl under a hash of the judge model and the full
    prompt (question, reference, answer), so a rerun asks nothing already judged, and a changed answer is
    asked again. No request is made without --judge-url."""
    cache_path = answers_path.with_name(answers_path.stem + "_judge.jsonl")
    cache = {}
    if cache_path.is_file():
        for line in cache_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                cache[record["key"]] = record["judgement"]
    keys = {name: hashlib.sha256(json.dumps([args.judge_model, messages], ensure_ascii=False).encode()).hexdigest()[:32]
            for name, (messages, _) in jobs.items()}
    verdicts = {name: cache[key] for name, key in keys.items() if key in cache}
    todo = [name for name in jobs if name not in verdicts]
    if todo and args.judge_url is None:
        print(f"{len(todo)} answer(s) not judged ({len(verdicts)} judged before): give --judge-url to judge them",
              file=sys.stderr)
    elif todo:
        failed = 0
        with ThreadPoolExecutor(max(1, args.judge_workers)) as pool, open(cache_path, "a", encoding="utf-8") as f, \
                tqdm(total=len(todo), desc=f"judging ({args.judge_model})", file=sys.stderr) as bar:
            futures = {pool.submit(ask_judge, args, *jobs[name]): name for name in todo}
            for future in as_completed(futures):
                name = futures[future]
                reply, verdict = future.result()
                if verdict is None:
                    failed += 1
                else:
                    verdicts[name] = verdict
                    f.write(json.dumps({"key": keys[name], "item": name, "judge_model": args.judge_model,
                                        "reply": reply, "judgement": verdict}, ensure_ascii=False) + "\n")
                    f.flush()
                bar.update(1)
        if failed:
            print(f"warning: {failed} answer(s) got no usable verdict (last reply kept out of the cache); "
                  "rerun to ask again", file=sys.stderr)
    return verdicts


def score_video_qa(items, args, answers_path):
    """The judge's figures as eval_msvd_qa.py computes them: accuracy = "yes" verdicts / ("yes" + "no")
    verdicts (ORIGINAL QUIRK: substring tests, "yes" first; a verdict with neither is left out, where the
    MSVD script stops), score = mean integer score; and, judge-free, the exact match of the normalised answer."""
    done = [q for q in items if q["text"] is not None]
    row = {"n": len(done)}
    if done:
        row["exact_match"] = 100 * mean(normalize(q["text"]) == normalize(q["answer"]) for q in done)
    jobs = {q["question_id"]: (qa_judge_messages(q["question"], q["answer"], q["text"]), True) for q in done}
    verdicts = run_judge(jobs, args, answers_path)
    if verdicts:
        preds = [v["pred"].lower() for v in verdicts.values()]
        yes = sum("yes" in p for p in preds)
        no = sum("yes" not in p and "no" in p for p in preds)
        row.update(accuracy=100 * yes / (yes + no) if yes + no else 0.0,
                   score=mean(v["score"] for v in verdicts.values()), judged=len(verdicts))
    return {args.benchmark: row}


def score_videochatgpt(items, args, answers_path):
    """Mean judge score (0-5) per aspect: correctness, detail, context (generic questions), temporal,
    consistency (the two answers of an item together)."""
    done = {q["question_id"]: q for q in items if q["text"] is not None}
    jobs = {}
    for q in done.values():
        for aspect in {"generic": ("correctness", "detail", "context"), "temporal": ("temporal",)}.get(q["type"], ()):
            messages = vcg_judge_messages(aspect, q["question"], q["answer"], q["text"])
            jobs[f"{aspect}:{q['question_id']}"] = (messages, False)
        if q["type"] == "consistency" and q["question_id"].endswith("/1") and f"{q['pair']}/2" in done:
            # ORIGINAL QUIRK: evaluate_benchmark_5_consistency.py fills "Question 2" with Q1, so the judge
            # never sees the second question; kept, the published consistency scores were judged that way
            jobs[f"consistency:{q['pair']}"] = (consistency_judge_messages(
                q["Q1"], q["Q1"], q["answer"], q["text"], done[f"{q['pair']}/2"]["text"]), False)
    verdicts = run_judge(jobs, args, answers_path)
    rows = {}
    for aspect in ("correctness", "detail", "context", "temporal", "consistency"):
        names = [name for name in jobs if name.startswith(aspect + ":")]
        if names:
            judged = [verdicts[n]["score"] for n in names if n in verdicts]
            rows[aspect] = {"score": mean(judged) if judged else None, "judged": len(judged), "n": len(names)}
    return rows


# ----------------------------------------------------------------------------------------------------------
# the registry

@dataclass
class Benchmark:
    """load(args) -> question dicts {question_id, question, guide?, image | video, answer?, type?, ...};
    score(items, args, answers_path) -> {row: {metric: value}} where items are the questions with "text"
    (the answer, None when unanswered); submit(items, args, path) writes the file the server takes.
    key(question_id, prompt) is what matches an answer line to its question; by_position: the original's
    scorer pairs answers with ground truth by their place in the answers file; from_original(records,
    questions) reads the original's own answer lines where they differ from ours."""
    load: Callable
    score: Callable
    max_new_tokens: int = 128  # the original's cap (model_vqa_loader.py)
    submit: Optional[Callable] = None
    submission: str = "upload.json"
    key: Callable = by_id
    by_position: bool = False
    from_original: Optional[Callable] = None


# video: answers capped at 512 new tokens, not the original's 1024, so that an hour-long prompt plus the cap stays
# within the 2048-token context (their answers are far shorter)
VIDEO_QA = dict(max_new_tokens=512, key=video_key, from_original=from_video_predictions)

BENCHMARKS = {
    "shapes": Benchmark(load_shapes, score_shapes, 32),  # short answers: "the red square appears"
    "msvd": Benchmark(load_msvd, score_video_qa, **VIDEO_QA),
    "msrvtt": Benchmark(load_msvd, score_video_qa, **VIDEO_QA),
    "activitynet": Benchmark(load_activitynet, score_video_qa, **VIDEO_QA),
    "videochatgpt": Benchmark(load_videochatgpt, score_videochatgpt, **VIDEO_QA),
    "gqa": Benchmark(load_gqa, score_gqa, submit=submit_gqa, submission="testdev_balanced_predictions.json"),
    "mme": Benchmark(load_mme, score_mme, key=mme_key, by_position=True),  # calculation.py: lines two by two
    "pope": Benchmark(load_pope, score_pope, by_position=True),  # eval_pope.py: labels by position
    "sqa": Benchmark(load_sqa, score_sqa, 1024),
    "textvqa": Benchmark(load_textvqa, score_vqa_style, key=textvqa_key),
    "vqav2": Benchmark(load_vqav2, score_vqa_style, submit=submit_vqav2),
    "vizwiz": Benchmark(load_vizwiz, score_vqa_style, submit=submit_vizwiz),
    "mmbench": Benchmark(load_mmbench, score_mmbench, 1024, submit_mmbench, "upload.xlsx"),
    "mmbench_cn": Benchmark(lambda args: load_mmbench(args, LETTER_ANSWER_CN), score_mmbench, 1024,
                            submit_mmbench, "upload.xlsx"),
    "seed": Benchmark(load_seed, score_seed, submit=submit_seed, submission="upload.jsonl"),
}
