"""benchmarks.py's paper benchmarks, run through eval.py: every scorer on small hand-made files whose figures are
worked out by hand here, with answers files as the original's scripts write them (repeated ids included), the
server files' formats, the judge (a fake OpenAI-compatible server), and resumable answering."""
import base64
import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks as B  # noqa: E402
import eval as E  # noqa: E402

SHORT = "\nAnswer the question using a single word or phrase."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def original_answers(path, rows):
    """An answers file as the original's model_vqa_loader.py / model_vqa.py write it: one line per question in
    question order, the question's id as its file gives it (repeats kept), its text as the prompt."""
    return write_jsonl(path, [{"question_id": qid, "prompt": prompt, "text": text, "answer_id": f"ans{n}",
                               "model_id": "llama-vid-7b-full-336", "metadata": {}}
                              for n, (qid, prompt, text) in enumerate(rows)])


def score(tmp_path, *argv):
    """Run `eval.py --score-only` in-process; the figures from its --out-json."""
    out = tmp_path / "figures.json"
    E.main(["--score-only", "--out-json", str(out), *map(str, argv)])
    return json.loads(out.read_text())["results"]["normal"]


def refused(tmp_path, *argv):
    """The one-line reason `eval.py --score-only` gives for not scoring an answers file."""
    with pytest.raises(ValueError) as e:
        E.main(["--score-only", "--out-json", str(tmp_path / "figures.json"), *map(str, argv)])
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------------------------
# VQA normalisation and accuracy (m4c_evaluator.py)

@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                        # number words -> digits
    ("none", "0"),                       # ... "none" included
    ("twenty", "twenty"),                # only zero..ten
    ("a dog", "dog"),                    # articles dropped
    ("An apple", "apple"),
    ("the", ""),
    ("3.5", "3.5"),                      # a period before a digit stays
    ("It is 3.5.", "it is 3.5"),         # the final one goes
    ("3.", "3"),                         # a period AFTER a digit goes too (the broken look-behind)
    ("e.g.", "eg"),
    ("1,000", "1000"),                   # commas dropped first
    ("hello-world", "hello world"),      # a mark between letters becomes a space
    ("well - done", "well done"),        # a mark touching a space is dropped
    ("Yes!", "yes"),
    ("dont", "don't"),                   # contractions restored
    ("couldnt've", "couldn't've"),
    ("Im", "im"),                        # the table's "Im" never matches a lower-cased answer
    ("the cat's toy", "cat 's toy"),     # "'s" split off
    ("x." * 33, "x" * 33 + "."),         # at most 32 periods removed (re.UNICODE passed as count)
])
def test_vqa_normalize(raw, expected):
    assert B.vqa_normalize(raw) == expected


def test_vqa_accuracy_leave_one_out():
    # k of the 10 humans say the answer. Leaving out one of those k, k-1 of the other 9 match; leaving out one
    # of the 10-k others, k match. acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10:
    # k=0: 0;  k=1: (1*0 + 9*1/3)/10 = 0.3;  k=2: (2*1/3 + 8*2/3)/10 = 0.6;  k=3: (3*2/3 + 7*1)/10 = 0.9;
    # k=4: (4*1 + 6*1)/10 = 1.0;  k=10: 1.0
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        humans = ["2"] * k + ["3"] * (10 - k)
        assert B.vqa_accuracy("two", humans) == pytest.approx(expected)  # "two" normalises to "2"
    # normalisation applies to the humans too: "Two", "2 ", "2." all are "2" -> 3 matches -> 0.9
    assert B.vqa_accuracy("2", ["Two", "2 ", "2."] + ["no"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        B.vqa_accuracy("2", ["2"] * 9)


def test_textvqa(tmp_path):
    ten = lambda *groups: [a for n, a in groups for _ in range(n)]  # noqa: E731
    ann = {"data": [
        {"image_id": "img1", "question": "What is written?", "answers": ten((2, "stop"), (8, "stop sign"))},
        {"image_id": "img1", "question": "What brand?", "answers": ten((5, "nike"), (5, "adidas"))},
        {"image_id": "img2", "question": "How many?", "answers": ten((3, "2"), (7, "3"))},
    ]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(ann))
    # LLaVA's file: the image id as question_id (repeated), OCR tokens as a middle line; a 2-line prompt too
    lines = [("img1", "What is written?\nReference OCR token: STOP, sign" + SHORT),
             ("img1", "what brand?\nReference OCR token: nike" + SHORT),
             ("img2", "How many?" + SHORT)]
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": t} for i, t in lines])
    argv = ["--benchmark", "textvqa", "--questions", q, "--annotations", tmp_path / "TextVQA_0.5.1_val.json"]
    # the original's answers file: both img1 lines under the id img1
    a = original_answers(tmp_path / "a.jsonl", [(i, t, x) for (i, t), x in zip(lines, ["STOP.", "Nike", "two"])])
    rows = score(tmp_path, *argv, "--answers", a)
    # eval_textvqa.py: "STOP." -> "stop": 2 humans -> 0.6; "Nike" -> "nike": 5 -> 1.0; "two" -> "2": 3 -> 0.9
    assert rows["overall"] == pytest.approx({"accuracy": 100 * 2.5 / 3, "n": 3})
    # it finds each line's annotation by (id, the question in the prompt), so the order of an image's lines
    # does not matter
    b = original_answers(tmp_path / "b.jsonl", [(*lines[1], "Nike"), (*lines[0], "STOP."), (*lines[2], "two")])
    assert score(tmp_path, *argv, "--answers", b)["overall"] == pytest.approx({"accuracy": 100 * 2.5 / 3, "n": 3})
    # an answer to a question the file does not ask, and one question unanswered: refused, with the counts
    c = original_answers(tmp_path / "c.jsonl", [(*lines[0], "STOP."), ("img1", "Who?\nReference OCR token: x" + SHORT, "me"),
                                                (*lines[2], "two")])
    assert "1 match no question" in refused(tmp_path, *argv, "--answers", c)
    assert "1 of 3 questions have no answer" in refused(tmp_path, *argv, "--answers", c)
    # --allow-partial scores the two that match: (0.6 + 0.9) / 2
    assert score(tmp_path, *argv, "--answers", c, "--allow-partial")["overall"] == pytest.approx({"accuracy": 75.0, "n": 2})


# ------------------------------------------------------------------------------------------------------------
# POPE (eval_pope.py)

@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog.", "yes"),
    ("Yes. But no dog.", "yes"),          # only the text before the first "." counts
    ("No, there is not.", "no"),          # comma dropped: "No" is a word
    ("There is no dog", "no"),
    ("I do not see one", "no"),
    ("no.", "no"),
    ("Not really", "yes"),                # "Not" is not in the list
    ("NO", "yes"),
    ("nope", "yes"),
    ("2.5 dogs, no", "yes"),              # cut at the "." of 2.5
])
def test_pope_answer(text, expected):
    assert B.pope_answer(text) == expected


def test_pope(tmp_path, capsys):
    coco = tmp_path / "coco"
    coco.mkdir()
    write_jsonl(coco / "coco_pope_adversarial.json", [{"label": x} for x in ["yes", "no", "yes", "no"]])
    write_jsonl(coco / "coco_pope_random.json", [{"label": x} for x in ["yes", "no", "yes"]])
    # splits interleaved: labels go with a split's questions by position within the split
    cats = ["adversarial", "random", "adversarial", "adversarial", "random", "adversarial", "random"]
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i + 1, "image": "x.jpg", "text": "Is there a dog?" + SHORT,
                                             "category": c} for i, c in enumerate(cats)])
    texts = {
        1: "Yes, there is a dog.",        # adv label yes: yes -> TP
        2: "NO",                          # random label yes: yes -> TP
        3: "No, there is not.",           # adv label no:  no  -> TN
        4: "Not really.",                 # adv label yes: yes ("Not") -> TP
        5: "I do not see one",            # random label no:  no -> TN
        6: "There is a cat. No dog.",     # adv label no:  yes (first sentence) -> FP
        7: "No.",                         # random label yes: no -> FN
    }
    answers = [(i, "Is there a dog?" + SHORT, t) for i, t in texts.items()]  # integer ids, as LLaVA's file has them
    argv = ["--benchmark", "pope", "--questions", q, "--annotations", coco]
    rows = score(tmp_path, *argv, "--answers", original_answers(tmp_path / "a.jsonl", answers))
    # adversarial TP2 FP1 TN1 FN0: acc 3/4, precision 2/3, recall 2/2, F1 2*(2/3)*1/(5/3) = 0.8, yes 3/4
    adv = {"accuracy": 75.0, "precision": 200 / 3, "recall": 100.0, "f1": 80.0, "yes_ratio": 75.0, "n": 4}
    # random TP1 FP0 TN1 FN1: acc 2/3, precision 1/1, recall 1/2, F1 2*1*0.5/1.5 = 2/3, yes 1/3
    rnd = {"accuracy": 200 / 3, "precision": 100.0, "recall": 50.0, "f1": 200 / 3, "yes_ratio": 100 / 3, "n": 3}
    assert rows["adversarial"] == pytest.approx(adv)
    assert rows["random"] == pytest.approx(rnd)
    avg = {m: (adv[m] + rnd[m]) / 2 for m in adv if m != "n"}  # e.g. F1 (80 + 66.67) / 2 = 73.33
    assert rows["average"] == pytest.approx({**avg, "n": 7})

    # eval_pope.py counts every answer line: a repeated line (chunks concatenated twice) shifts the labels of all
    # that follow. We refuse it, naming the count.
    a = original_answers(tmp_path / "b.jsonl", answers[:3] + [answers[2]] + answers[3:])
    assert "1 repeat an answered one" in refused(tmp_path, *argv, "--answers", a)
    # question 7 unanswered: refused; --allow-partial scores the rest and says the table is partial
    a = original_answers(tmp_path / "c.jsonl", answers[:6])
    assert "1 of 7 questions have no answer" in refused(tmp_path, *argv, "--answers", a)
    capsys.readouterr()
    rows = score(tmp_path, *argv, "--answers", a, "--allow-partial")
    assert rows["random"] == pytest.approx({**rnd, "accuracy": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 50.0,
                                           "n": 2})  # TP1 TN1 of questions 2, 5
    assert "normal: PARTIAL, 6 of 7 questions answered" in capsys.readouterr().out
    assert json.loads((tmp_path / "figures.json").read_text())["n_answered"] == {"normal": 6}


# ------------------------------------------------------------------------------------------------------------
# MME (convert_answer_to_mme.py + calculation.py)

@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("yes, there is", "yes"), ("Not sure", "no"), ("Snow", "no"),
    ("nope", "no"), ("The answer is yes", "other"), ("Maybe yes", "other"), ("Yesno", "yes"), ("", "other"),
])
def test_mme_answer(text, expected):
    assert B.mme_answer(text) == expected


def test_mme(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "existence").mkdir(parents=True)  # flat: images and .txt side by side
    (root / "existence" / "0001.txt").write_text(
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? Please answer yes or no.\tNo\n")
    (root / "existence" / "0002.txt").write_text(  # the second question has two spaces before "Please"
        "Is there a car in this image? Please answer yes or no.\tYes\n"
        "Is there a bus in this image?  Please answer yes or no.\tNo\n")
    (root / "artwork" / "images").mkdir(parents=True)  # images/ + questions_answers_YN/
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tYes\nIs this artwork by Dali? Please answer yes or no.\tNo\n")
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "0020.txt").write_text(
        "Will the code print 3? Please answer yes or no.\tYes\nWill the code print 4? Please answer yes or no.\tNo\n")
    lines = [("existence/0001.jpg", "Is there a dog in this image?"), ("existence/0001.jpg", "Is there a cat in this image?"),
             ("existence/0002.jpg", "Is there a car in this image?"), ("existence/0002.jpg", "Is there a bus in this image?"),
             ("artwork/10.jpg", "Is this artwork by Monet?"), ("artwork/10.jpg", "Is this artwork by Dali?"),
             ("code_reasoning/0020.png", "Will the code print 3?"), ("code_reasoning/0020.png", "Will the code print 4?")]
    # LLaVA's llava_mme.jsonl: both questions of an image under the image's id
    q = write_jsonl(tmp_path / "llava_mme.jsonl", [{"question_id": i, "image": i, "text": t + SHORT,
                                                    "category": i.split("/")[0]} for i, t in lines])
    texts = ["Yes", "Not sure",                 # existence/0001: yes (right), no (right)
             "yes, there is", "There is no bus",  # existence/0002: yes (right), other (wrong)
             "Snow", "No",                      # artwork: "no" (wrong), no (right)
             "YES", "no"]                       # code_reasoning: both right
    answers = [(i, t + SHORT, x) for (i, t), x in zip(lines, texts)]
    argv = ["--benchmark", "mme", "--questions", q, "--annotations", root]

    def check(rows):
        # existence: 3 of 4 right -> acc 75; images both right: 1 of 2 -> acc+ 50; score 125
        assert rows["existence"] == pytest.approx({"acc": 75.0, "acc+": 50.0, "score": 125.0, "n": 4})
        # artwork: 1 of 2 -> 50; 0 of 1 image -> 0; score 50
        assert rows["artwork"] == pytest.approx({"acc": 50.0, "acc+": 0.0, "score": 50.0, "n": 2})
        assert rows["code_reasoning"] == pytest.approx({"acc": 100.0, "acc+": 100.0, "score": 200.0, "n": 2})
        assert rows["perception"] == pytest.approx({"score": 175.0, "n": 6})  # 125 + 50
        assert rows["cognition"] == pytest.approx({"score": 200.0, "n": 2})
    check(score(tmp_path, *argv, "--answers", original_answers(tmp_path / "a.jsonl", answers)))
    # convert_answer_to_mme.py looks each line's truth up by (image, question in the prompt): the two lines of an
    # image in the other order score the same (calculation.py still takes them as one image's pair)
    swapped = [answers[1], answers[0]] + answers[2:]
    check(score(tmp_path, *argv, "--answers", original_answers(tmp_path / "b.jsonl", swapped)))
    # one question of an image unanswered: refused (calculation.py would pair the wrong lines)
    assert "1 of 8 questions have no answer" in refused(
        tmp_path, *argv, "--answers", original_answers(tmp_path / "c.jsonl", answers[1:]))


# ------------------------------------------------------------------------------------------------------------
# ScienceQA-IMG (eval_science_qa.py)

@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("B. dog", "B"), ("The answer is C.", "C"), ("Answer: The answer is D, surely", "D"),
    ("A.", "FAILED"),                              # too short for "X. ", not a bare letter
    ("The answer is B", "FAILED"),                 # the regex wants one more character after the letter
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("(A)", "FAILED"),
])
def test_sqa_letter(text, expected):
    assert B.sqa_letter(text) == expected


def test_sqa(tmp_path):
    base = tmp_path / "scienceqa"
    base.mkdir()
    img = "image.png"
    problems = {  # choices, index of the right one, image
        "1": ([1, 2, 3], 0, img), "2": ([1, 2], 1, img), "3": ([1, 2, 3, 4], 2, None), "4": ([1, 2, 3], 2, img),
        "5": ([1, 2], 0, img), "6": ([1, 2, 3], 0, None), "7": ([1, 2], 1, img), "8": ([1, 2], 1, img)}
    (base / "problems.json").write_text(json.dumps(
        {k: {"choices": c, "answer": a, "image": i} for k, (c, a, i) in problems.items()}))
    (base / "pid_splits.json").write_text(json.dumps({"test": list(problems), "val": []}))
    q = tmp_path / "llava_test_CQM-A.json"
    q.write_text(json.dumps([dict({"id": k, "conversations": [
        {"from": "human", "value": f"Context: N/A\nQuestion: q{k}?\nOptions: (A) x (B) y\n<image>"},
        {"from": "gpt", "value": "A"}]}, **({"image": f"{k}/{i}"} if i else {})) for k, (_, _, i) in problems.items()]))
    texts = [
        ("1", "A"),                                   # right (IMG)
        ("2", "B. dog"),                              # right (IMG)
        ("3", "The answer is C."),                    # right (no image)
        ("4", "C."),                                  # unparsable: wrong (IMG)
        # "5" unanswered: wrong, and left out of IMG (the original's 'Unknown' prompt has no <image>)
        ("6", "The answer is A. The answer is B."),   # two matches: wrong (no image)
        ("7", "E"),                                   # past the 2 choices: wrong (IMG)
        ("8", "The answer is B"),                     # unparsable ...
        ("8", "B"),                                   # ... but a later line of 8 replaces it: right (IMG)
    ]
    # model_vqa_science.py's prompt: "<image>\n" before the question where there is an image, the suffix after
    prompt = lambda k: ("<image>\n" if problems[k][2] else "") + f"Context: N/A\nQuestion: q{k}?\nOptions: (A) x (B) y" \
        + "\n" + B.LETTER_ANSWER  # noqa: E731
    a = original_answers(tmp_path / "a.jsonl", [(k, prompt(k), t) for k, t in texts])
    argv = ["--benchmark", "sqa", "--questions", q, "--annotations", base, "--answers", a]
    assert "1 repeat an answered one, and 1 of 8 questions have no answer" in refused(tmp_path, *argv)
    # eval_science_qa.py keeps the last line of an id and counts a problem without one wrong
    rows = score(tmp_path, *argv, "--allow-partial")
    assert rows["overall"] == pytest.approx({"accuracy": 100 * 4 / 8, "n": 8})   # 1, 2, 3, 8 right of 8
    assert rows["IMG"] == pytest.approx({"accuracy": 100 * 3 / 5, "n": 5})       # 1, 2, 8 right of 1, 2, 4, 7, 8
    # the question asked: the letter suffix appended, no image token, images not padded
    args = E.parse_args(["--benchmark", "sqa", "--questions", str(q), "--annotations", str(base)])
    first = B.load_sqa(args)[0]
    assert first["question"].endswith("Options: (A) x (B) y\n" + B.LETTER_ANSWER) and first["pad"] is False


def test_sqa_images_not_padded(tmp_path):
    """load_media honours a question's pad=False even for a model whose config pads (image_aspect_ratio)."""
    from media import preprocess_images
    Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3)).save(tmp_path / "wide.png")
    model = SimpleNamespace(pads_images=True, image_size=28)  # image_aspect_ratio "pad" in its config
    image = Image.open(tmp_path / "wide.png").convert("RGB")
    unpadded = E.load_media({"image": "wide.png", "pad": False}, tmp_path, model, 1.0, None)
    padded = E.load_media({"image": "wide.png"}, tmp_path, model, 1.0, None)
    assert np.array_equal(unpadded.pixels.numpy(), preprocess_images([image], 28, pad_to_square=False).numpy())
    assert np.array_equal(padded.pixels.numpy(), preprocess_images([image], 28, pad_to_square=True).numpy())


# ------------------------------------------------------------------------------------------------------------
# GQA (convert_gqa_for_eval.py + eval.py)

def test_gqa(tmp_path):
    ann = {"q1": ("yes", True, "verify"), "q2": ("left", True, "query"), "q3": ("no", True, "logical"),
           "q4": ("table", True, "query"), "q5": ("red", False, "query"), "q6": ("yes", True, "compare")}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(
        {k: {"answer": a, "isBalanced": b, "types": {"structural": s}, "question": "?"} for k, (a, b, s) in ann.items()}))
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": k, "image": f"{k}.jpg", "text": "?" + SHORT} for k in ann])
    texts = [
        ("q1", "Yes."),          # "yes": right
        ("q2", "The left."),     # "the left": wrong (no article removal)
        ("q3", "No."),           # right
        ("q4", "Table"),         # right
        ("q5", "Blue"),          # not balanced: not scored
        ("q6", "Yes, it is."),   # "yes, it is": wrong ...
        ("q6", "yes"),           # ... but GQA's eval.py keeps the last prediction of an id: right
    ]
    a = original_answers(tmp_path / "a.jsonl", [(k, "?" + SHORT, t) for k, t in texts])
    argv = ["--benchmark", "gqa", "--questions", q, "--annotations", tmp_path / "testdev_balanced_questions.json"]
    assert "1 repeat an answered one, and 0 of 6" in refused(tmp_path, *argv, "--answers", a)
    rows = score(tmp_path, *argv, "--answers", a, "--allow-partial")
    assert rows["overall"] == pytest.approx({"accuracy": 80.0, "n": 5})        # q1 q3 q4 q6 of q1 q2 q3 q4 q6
    assert rows["binary"] == pytest.approx({"accuracy": 100.0, "n": 3})        # q1 q3 q6 of q1 q3 q6
    assert rows["open"] == pytest.approx({"accuracy": 50.0, "n": 2})           # q4 of q2 q4
    predictions = json.loads((tmp_path / "a_testdev_balanced_predictions.json").read_text())
    assert predictions[:3] == [{"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "the left"},
                               {"questionId": "q3", "prediction": "no"}]
    assert predictions[5:] == [{"questionId": "q6", "prediction": "yes"}]
    # GQA's eval.py refuses a set with a balanced question unanswered, and so do we without --allow-partial
    b = original_answers(tmp_path / "b.jsonl", [("q1", "?" + SHORT, "yes")])
    assert "5 of 6 questions have no answer" in refused(tmp_path, *argv, "--answers", b)
    assert score(tmp_path, *argv, "--answers", b, "--allow-partial")["overall"] == pytest.approx({"accuracy": 100.0, "n": 1})


# ------------------------------------------------------------------------------------------------------------
# SEED-Bench

def test_seed(tmp_path):
    ann = {"question_type": {"Scene Understanding": 1, "Instance Identity": 2}, "questions": [
        {"question_id": "101", "answer": "A", "data_type": "image", "question_type_id": 1},
        {"question_id": "102", "answer": "B", "data_type": "image", "question_type_id": 2},
        {"question_id": "103", "answer": "C", "data_type": "image", "question_type_id": 1},
        {"question_id": "104", "answer": "D", "data_type": "video", "question_type_id": 2}]}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(ann))
    text = "What?\nA. a\nB. b\nC. c\nD. d\n" + B.LETTER_ANSWER
    # LLaVA's llava-seed-bench.jsonl numbers its ids; SEED-Bench.json spells them as strings
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": text} for i in (101, 102, 103, 104)])
    # 102: "B." != "B" (exact match), but a later line of 102 replaces it; 103 unanswered
    a = original_answers(tmp_path / "a.jsonl", [(101, text, "A"), (102, text, "B."), (104, text, "D"), (102, text, "B")])
    argv = ["--benchmark", "seed", "--questions", q, "--annotations", tmp_path / "SEED-Bench.json", "--answers", a]
    assert "1 repeat an answered one, and 1 of 4 questions have no answer" in refused(tmp_path, *argv)
    # convert_seed_for_submission.py: the last line of an id counts, a question without one is wrong
    rows = score(tmp_path, *argv, "--allow-partial")
    assert rows["Scene Understanding"] == pytest.approx({"accuracy": 50.0, "n": 2})   # 101 of 101, 103
    assert rows["Instance Identity"] == pytest.approx({"accuracy": 100.0, "n": 2})    # 102, 104
    assert rows["image"] == pytest.approx({"accuracy": 200 / 3, "n": 3})              # 101, 102 of 101, 102, 103
    assert rows["video"] == pytest.approx({"accuracy": 100.0, "n": 1})
    assert rows["overall"] == pytest.approx({"accuracy": 75.0, "n": 4})
    upload = [json.loads(line) for line in (tmp_path / "a_upload.jsonl").read_text().splitlines()]
    assert upload == [{"question_id": "101", "prediction": "A"}, {"question_id": "102", "prediction": "B"},
                      {"question_id": "104", "prediction": "D"}]
    # the letter suffix is appended to a question that lacks it
    q = write_jsonl(tmp_path / "bare.jsonl", [{"question_id": 101, "image": "101.jpg", "text": "What?\nA. a\nB. b"}])
    args = E.parse_args(["--benchmark", "seed", "--questions", str(q), "--annotations", str(tmp_path / "SEED-Bench.json")])
    assert B.load_seed(args)[0]["question"] == "What?\nA. a\nB. b\n" + B.LETTER_ANSWER


# ------------------------------------------------------------------------------------------------------------
# VQAv2, VizWiz: server files and local scores (MMBench below)

def test_vqav2_and_vizwiz(tmp_path):
    q = write_jsonl(tmp_path / "test-dev.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "How many?" + SHORT},
                                                  {"question_id": 2, "image": "b.jpg", "text": "Is it?" + SHORT}])
    full = write_jsonl(tmp_path / "test2015.jsonl", [{"question_id": i, "image": "x.jpg", "text": "?"} for i in (1, 2, 3)])
    # question 1 answered twice: convert_vqav2_for_submission.py keeps the last
    a = original_answers(tmp_path / "a.jsonl", [(1, "How many?" + SHORT, "Two dogs."), (2, "Is it?" + SHORT, "Yes"),
                                                (1, "How many?" + SHORT, "Three.")])
    argv = ["--benchmark", "vqav2", "--questions", q, "--annotations", full, "--answers", a]
    assert "1 repeat an answered one" in refused(tmp_path, *argv)
    assert score(tmp_path, *argv, "--allow-partial")["overall"] == {"n": 2}  # nothing to score locally on test-dev
    upload = json.loads((tmp_path / "a_upload.json").read_text())
    # every question of the full test split, ids as integers, answers normalised, "" outside test-dev
    assert upload == [{"question_id": 1, "answer": "3"}, {"question_id": 2, "answer": "yes"},
                      {"question_id": 3, "answer": ""}]
    # scored locally against an official annotation file: "3" matches 3 of 10 humans -> 0.9, "yes" 10 -> 1.0
    ann = tmp_path / "v2_annotations.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "3"}] * 3 + [{"answer": "2"}] * 7},
        {"question_id": 2, "answers": [{"answer": "yes"}] * 10}]}))
    rows = score(tmp_path, "--benchmark", "vqav2", "--questions", q, "--annotations", ann, "--answers", a, "--allow-partial")
    assert rows["overall"] == pytest.approx({"accuracy": 95.0, "n": 2})

    name = "VizWiz_test_00000000.jpg"
    q = write_jsonl(tmp_path / "vizwiz.jsonl", [{"question_id": name, "image": name, "text": "What is this?" + SHORT},
                                                {"question_id": "VizWiz_test_00000001.jpg", "image": "VizWiz_test_00000001.jpg",
                                                 "text": "What colour?" + SHORT}])
    a = original_answers(tmp_path / "v.jsonl", [(name, "What is this?" + SHORT, "Unanswerable.")])
    # convert_vizwiz_for_submission.py asserts every question has an answer
    assert "1 of 2 questions have no answer" in refused(tmp_path, "--benchmark", "vizwiz", "--questions", q, "--answers", a)
    score(tmp_path, "--benchmark", "vizwiz", "--questions", q, "--answers", a, "--allow-partial")
    assert json.loads((tmp_path / "v_upload.json").read_text()) == [{"image": name, "answer": "unanswerable"}]


# ------------------------------------------------------------------------------------------------------------
# the judge: a fake OpenAI-compatible server

class FakeJudge:
    """Answers /v1/chat/completions with replies chosen by `rule(request json)`; keeps every request."""

    def __init__(self, rule):
        self.rule, self.requests = rule, []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": judge.rule(body)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_server():
    servers = []
    yield lambda rule: servers.append(FakeJudge(rule)) or servers[-1]
    for s in servers:
        s.close()


def test_video_qa_judge(tmp_path, judge_server):
    qa = [{"video_id": "v1", "question": "what is running?", "id": 7, "answer": "dog"},
          {"video_id": "v1", "question": "what sits?", "id": 7, "answer": "cat"},     # a repeated id: "7_1"
          {"video_id": "v2", "question": "what flies?", "id": 9, "answer": "bird"}]
    (tmp_path / "test_qa.json").write_text(json.dumps(qa))
    # model_msvd_qa.py's prediction lines; eval_msvd_qa.py names the k-th line of an id "<id>_<k>"
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": x["id"], "question": x["question"], "answer": x["answer"], "pred": p}
                                           for x, p in zip(qa, ["A dog.", "cat", "gibberish"])])
    replies = {"A dog.": "{'pred': 'yes', 'score': 4.8}",               # int(4.8) = 4
               "cat": "Here it is: {'pred': 'no', 'score': 2}",        # a dict inside prose is read
               "gibberish": "I cannot judge that."}                    # unparsable: asked 3 times, not cached
    server = judge_server(lambda body: replies[body["messages"][1]["content"].split("Predicted Answer: ")[1].split("\n")[0]])
    argv = ["--benchmark", "msvd", "--questions", tmp_path / "test_qa.json", "--answers", a,
            "--judge-url", server.url, "--judge-model", "judge-x", "--judge-key", "k123", "--judge-workers", "2"]
    rows = score(tmp_path, *argv)["msvd"]
    # judged 2: "yes" verdicts 1 of 1 yes + 1 no -> 50 %; score (4 + 2) / 2 = 3
    # exact match after normalize: "a dog" != "dog", "cat" == "cat", "gibberish" != "bird" -> 1/3
    assert rows == pytest.approx({"n": 3, "exact_match": 100 / 3, "accuracy": 50.0, "score": 3.0, "judged": 2})
    assert len(server.requests) == 1 + 1 + 3
    first = next(r for r in server.requests if "A dog." in r["body"]["messages"][1]["content"])
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer k123"
    assert first["body"]["model"] == "judge-x" and first["body"]["messages"][0]["role"] == "system"
    user = first["body"]["messages"][1]["content"]
    assert "Question: what is running?\nCorrect Answer: dog\nPredicted Answer: A dog." in user
    assert "'pred'" in user and "'score'" in user

    # a rerun asks only what has no verdict yet (the unparsable one); once it has one, nothing
    replies["gibberish"] = "{'pred': 'no', 'score': 0}"
    rows = score(tmp_path, *argv)["msvd"]
    assert len(server.requests) == 5 + 1 and "gibberish" in server.requests[-1]["body"]["messages"][1]["content"]
    assert rows["judged"] == 3 and rows["accuracy"] == pytest.approx(100 / 3) and rows["score"] == pytest.approx(2.0)
    score(tmp_path, *argv)
    assert len(server.requests) == 6
    # without --judge-url: the cached verdicts, no request
    rows = score(tmp_path, "--benchmark", "msvd", "--questions", tmp_path / "test_qa.json", "--answers", a,
                 "--judge-model", "judge-x")["msvd"]
    assert len(server.requests) == 6 and rows["judged"] == 3
    # another judge model is another cache entry: without a URL, nothing is judged
    rows = score(tmp_path, "--benchmark", "msvd", "--questions", tmp_path / "test_qa.json", "--answers", a)["msvd"]
    assert "judged" not in rows and rows["exact_match"] == pytest.approx(100 / 3)


def test_videochatgpt_judge(tmp_path, judge_server):
    (tmp_path / "generic_qa.json").write_text(json.dumps([{"video_name": "v_a", "Q": "What happens?", "A": "A man runs."}]))
    (tmp_path / "temporal_qa.json").write_text(json.dumps([{"video_name": "v_a", "Q": "What first?", "A": "He stands, then runs."}]))
    (tmp_path / "consistency_qa.json").write_text(json.dumps([{"video_name": "v_a", "Q1": "What does the man do?",
                                                               "Q2": "Describe the man's action.", "A": "He runs."}]))
    # the three prediction files of model_video_chatgpt_general.py / _consistency.py, one after the other: the
    # benchmark's items with "pred" (a generic and a temporal line alike), or "pred1" and "pred2"
    a = write_jsonl(tmp_path / "a.jsonl", [
        {"video_name": "v_a", "Q": "What happens?", "A": "A man runs.", "pred": "A man is running."},
        {"video_name": "v_a", "Q": "What first?", "A": "He stands, then runs.", "pred": "He runs."},
        {"video_name": "v_a", "Q1": "What does the man do?", "Q2": "Describe the man's action.", "A": "He runs.",
         "pred1": "Running.", "pred2": "Walking."}])
    scores = {"factual accuracy": "{'score': 4}", "detail orientation": "{'score': 3}",
              "contextual understanding": "{'score': 5}", "temporal understanding": "{'score': 2.9}",
              "consistent": "{'score': 1}"}
    server = judge_server(lambda body: next(v for k, v in scores.items() if k in body["messages"][0]["content"]))
    rows = score(tmp_path, "--benchmark", "videochatgpt", "--questions", tmp_path, "--answers", a, "--judge-url", server.url)
    got = {aspect: (row["score"], row["judged"]) for aspect, row in rows.items()}
    assert got == {"correctness": (4, 1), "detail": (3, 1), "context": (5, 1), "temporal": (2, 1), "consistency": (1, 1)}
    assert len(server.requests) == 5
    consistency = next(r for r in server.requests if "consistent" in r["body"]["messages"][0]["content"])
    user = consistency["body"]["messages"][1]["content"]
    # the original shows Q1 as both questions
    assert "Question 1: What does the man do?\nQuestion 2: What does the man do?\nCorrect Answer: He runs." in user
    assert "Predicted Answer to Question 1: Running.\nPredicted Answer to Question 2: Walking." in user
    score(tmp_path, "--benchmark", "videochatgpt", "--questions", tmp_path, "--answers", a, "--judge-url", server.url)
    assert len(server.requests) == 5  # all cached


def test_activitynet_predictions(tmp_path):
    (tmp_path / "test_q.json").write_text(json.dumps([
        {"video_name": "a", "question_id": "v_a_0", "question": "is it day?"},
        {"video_name": "a", "question_id": "v_a_0", "question": "what colour is the car?"},  # a repeated id
        {"video_name": "b", "question_id": "v_b_1", "question": "how many dogs?"}]))
    (tmp_path / "test_a.json").write_text(json.dumps([  # the answers go with the questions by position
        {"question_id": "v_a_0", "answer": "yes", "type": 3}, {"question_id": "v_a_0", "answer": "red", "type": 2},
        {"question_id": "v_b_1", "answer": "2", "type": 4}]))
    line = lambda i, q, a, p: {"id": i, "question": q, "answer": a, "pred": p}  # noqa: E731  model_activitynet_qa.py's
    preds = [line("v_a_0", "is it day?", "yes", "Yes."), line("v_a_0", "what colour is the car?", "red", "red"),
             line("v_b_1", "how many dogs?", "2", "3")]
    argv = ["--benchmark", "activitynet", "--questions", tmp_path / "test_q.json"]
    # the k-th line of an id is "<id>_<k>": "Yes." (= "yes"), "red" right, "3" wrong (the judge-free exact match)
    rows = score(tmp_path, *argv, "--answers", write_jsonl(tmp_path / "a.jsonl", preds))["activitynet"]
    assert rows == pytest.approx({"n": 3, "exact_match": 200 / 3})
    # the judge reads question and reference from the line itself: lines of an id in another order than the
    # question file's would be judged against other questions than ours, so they are refused
    swapped = write_jsonl(tmp_path / "b.jsonl", [preds[1], preds[0], preds[2]])
    assert "2 match no question" in refused(tmp_path, *argv, "--answers", swapped)


def test_parse_judgement():
    assert B.parse_judgement("{'pred': 'yes', 'score': 4.8}", True) == {"pred": "yes", "score": 4}
    assert B.parse_judgement("```python\n{'score': '3'}\n```", False) == {"score": 3}
    assert B.parse_judgement("{'score': 3}", True) is None  # a QA verdict needs 'pred'
    assert B.parse_judgement("{'predicted': 'no', 'score': 1}", True) == {"pred": "no", "score": 1}
    assert B.parse_judgement("five", False) is None


# ------------------------------------------------------------------------------------------------------------
# with the tiny fixture checkpoints: resumable answering, the MMBench server file, a video benchmark

def image_file(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def counting_generate(monkeypatch, fail_after=None):
    """Wrap LlamaVID.generate: count calls (one per batch), keep the Q-Former prompts, raise after some calls."""
    import model as model_module
    original = model_module.LlamaVID.generate
    calls = {"n": 0, "prompts": []}

    def generate(self, input_ids, media, prompts, **kw):
        if fail_after is not None and calls["n"] >= fail_after:
            raise RuntimeError("interrupted")
        calls["n"] += 1
        calls["prompts"] += prompts
        return original(self, input_ids, media, prompts, **kw)
    monkeypatch.setattr(model_module.LlamaVID, "generate", generate)
    return calls


RESUMABLE = {  # four questions of one image: POPE's ids are unique, MME's and TextVQA's repeat
    "pope": lambda i: {"question_id": i, "category": "random", "text": f"Is there a thing {i} in the image?" + SHORT,
                       "label": "yes" if i % 2 else "no"},
    "mme": lambda i: {"question_id": f"existence/{i // 2}.png", "category": "existence",
                      "text": f"Is there a thing {i} in the image?" + SHORT, "answer": "Yes" if i % 2 else "No"},
    "textvqa": lambda i: {"question_id": f"img{i // 2}", "text": f"What is written {i}?" + SHORT, "answers": ["x"] * 10},
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resumable_run(name, tmp_path, fixtures, monkeypatch, capsys):
    image_file(tmp_path / "img.png")
    q = write_jsonl(tmp_path / "q.jsonl", [{**RESUMABLE[name](i), "image": "img.png"} for i in range(4)])

    def run(answers):
        E.main(["--benchmark", name, "--model-path", str(fixtures / "image"), "--questions", str(q),
                "--image-folder", str(tmp_path), "--answers", str(answers), "--batch-size", "1",
                "--max-new-tokens", "3", "--out-json", str(answers.with_suffix(".json"))])

    calls = counting_generate(monkeypatch)
    run(tmp_path / "full.jsonl")
    assert calls["n"] == 4
    monkeypatch.undo()
    calls = counting_generate(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "cut.jsonl")
    assert len((tmp_path / "cut.jsonl").read_text().splitlines()) == 2  # answers were appended as they came
    monkeypatch.undo()
    calls = counting_generate(monkeypatch)
    run(tmp_path / "cut.jsonl")
    assert calls["n"] == 2  # only the two unanswered
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "cut.jsonl") == read(tmp_path / "full.jsonl")
    # the question ids as the question file gives them, repeats included, as model_vqa_loader.py writes them
    assert [r["question_id"] for r in read(tmp_path / "cut.jsonl")] == [RESUMABLE[name](i)["question_id"]
                                                                        for i in range(4)]
    run(tmp_path / "cut.jsonl")
    assert calls["n"] == 2  # nothing left to answer
    figures = json.loads((tmp_path / "cut.json").read_text())
    assert figures["benchmark"] == name and figures["n_questions"] == 4 and figures["n_answered"] == {"normal": 4}
    assert "PARTIAL" not in capsys.readouterr().out
    if name == "pope":
        assert set(figures["results"]["normal"]["random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}
    if name == "mme":
        assert figures["results"]["normal"]["existence"]["n"] == 4


def mmbench_tsv(tmp_path):
    """A two-question MMBench TSV with its images as base64 cells."""
    def b64(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows = [["10", "What is it?", "", "cat", "dog", "cow", "", "B", "cat1", b64(0), "src", "l2", "", "dev"],
            ["11", "Is it?", "A hint", "yes", "None", "no", "", "A", "cat2", b64(1), "src", "l2", "", "dev"]]
    tsv = tmp_path / "mmbench_dev.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")
    return tsv


def read_xlsx(path):
    """The cells of an .xlsx's first sheet, row by row, as openpyxl reads them back."""
    openpyxl = pytest.importorskip("openpyxl")
    return [list(row) for row in openpyxl.load_workbook(path).active.iter_rows(values_only=True)]


def test_mmbench_original_answers_and_xlsx(tmp_path):
    pytest.importorskip("openpyxl")
    tsv = mmbench_tsv(tmp_path)
    # model_vqa_mmbench.py's lines: the TSV's index as question_id (a number), a round_id, the options
    line = lambda idx, text: {"question_id": idx, "round_id": 0, "prompt": "...", "text": text,  # noqa: E731
                              "options": ["x"], "option_char": ["A"], "answer_id": "a", "model_id": "m", "metadata": {}}
    a = write_jsonl(tmp_path / "a.jsonl", [line(10, "A"), line(11, "A."), line(10, "B")])
    argv = ["--benchmark", "mmbench", "--questions", tsv, "--answers", a]
    assert "1 repeat an answered one, and 0 of 2" in refused(tmp_path, *argv)
    # convert_mmbench_for_submission.py sets each line's prediction in turn: the last line of 10 stays
    rows = score(tmp_path, *argv, "--allow-partial")
    assert rows["overall"] == pytest.approx({"n": 2, "accuracy_single_pass": 100.0})  # "B" for B, "A." for A
    cells = read_xlsx(tmp_path / "a_upload.xlsx")
    # the TSV less hint, category, image, source, l2-category, comment; "prediction" 7th; the index a number;
    # empty cells (and "None", NaN to pandas) empty, as pandas writes them
    assert cells == [["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"],
                     [10, "What is it?", "cat", "dog", "cow", None, "B", "B", "dev"],
                     [11, "Is it?", "yes", None, "no", None, "A.", "A", "dev"]]


def test_mmbench_without_openpyxl(tmp_path, monkeypatch):
    """The server file needs openpyxl, an optional extra: without it, one line with the install hint, before
    any answering."""
    find_spec = B.importlib.util.find_spec
    monkeypatch.setattr(B.importlib.util, "find_spec", lambda name, *a: None if name == "openpyxl" else find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install openpyxl"):
        E.main(["--benchmark", "mmbench", "--questions", str(mmbench_tsv(tmp_path)), "--model-path", str(tmp_path)])


def test_mmbench_run_and_xlsx(tmp_path, fixtures, monkeypatch):
    pytest.importorskip("openpyxl")
    tsv = mmbench_tsv(tmp_path)
    calls = counting_generate(monkeypatch)
    answers = tmp_path / "mm.jsonl"
    E.main(["--benchmark", "mmbench", "--model-path", str(fixtures / "image"), "--questions", str(tsv),
            "--answers", str(answers), "--max-new-tokens", "3", "--out-json", str(tmp_path / "mm.json")])
    # the Q-Former is guided without the letter suffix; an option "None" ends the options (pandas NaN)
    assert calls["prompts"] == [["What is it?\nA. cat\nB. dog\nC. cow"], ["A hint\nIs it?\nA. yes"]]
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert records[0]["prompt"] == "What is it?\nA. cat\nB. dog\nC. cow\n" + B.LETTER_ANSWER
    cells = read_xlsx(tmp_path / "mm_upload.xlsx")
    text = "".join(c for c in records[0]["text"] if c >= " " or c in "\t\n\r")  # control characters a sheet can't hold
    assert cells[1] == [10, "What is it?", "cat", "dog", "cow", None, text or None, "B", "dev"]


def test_msvd_run_on_a_video(tmp_path, fixtures):
    from media import write_video
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "vid1.mkv", frames, fps=2)  # found by trying .mp4, .avi, .mov, .mkv in turn
    (tmp_path / "test_qa.json").write_text(json.dumps([{"video_id": "vid1", "question": "what is shown?", "id": 0,
                                                         "answer": "noise"}]))
    res = E.main(["--benchmark", "msvd", "--model-path", str(fixtures / "video"), "--questions",
                  str(tmp_path / "test_qa.json"), "--answers", str(tmp_path / "a.jsonl"), "--max-new-tokens", "3",
                  "--out-json", str(tmp_path / "a.json")])
    assert res["normal"]["msvd"]["n"] == 1 and "exact_match" in res["normal"]["msvd"]
    assert json.loads((tmp_path / "a.jsonl").read_text())["question_id"] == "0_0"


def test_device_and_dtype_picked_as_sample_does(fixtures, monkeypatch):
    """--device / --dtype auto: CUDA in bfloat16 where there is a GPU, else the CPU in float32."""
    import model as model_module
    from types import SimpleNamespace
    got = {}
    loaded = SimpleNamespace(llm=SimpleNamespace(fuse=lambda: None))  # what from_pretrained gives (CUDA fuses it)
    monkeypatch.setattr(model_module.LlamaVID, "from_pretrained",
                        classmethod(lambda cls, path, **kw: got.update(kw) or loaded))
    args = E.parse_args(["--model-path", str(fixtures / "image")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert E.load_model(args)[0] is loaded
    assert (got["device"], got["dtype"]) == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    E.load_model(args)
    assert (got["device"], got["dtype"]) == (torch.device("cuda"), torch.bfloat16)
    E.load_model(E.parse_args(["--model-path", str(fixtures / "image"), "--device", "cpu", "--dtype", "float16"]))
    assert (got["device"], got["dtype"]) == (torch.device("cpu"), torch.float16)


def test_command_line_refuses_a_partial_answers_file(tmp_path):
    """`python eval.py --score-only` on answers that do not cover the questions: one line, exit code 2."""
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": "x.jpg", "text": "Is it?" + SHORT,
                                             "category": "random", "label": "yes"} for i in (1, 2, 3)])
    a = original_answers(tmp_path / "a.jsonl", [(1, "Is it?" + SHORT, "Yes"), (2, "Is it?" + SHORT, "No"),
                                                (9, "Is it?" + SHORT, "Yes")])
    argv = [sys.executable, str(Path(E.__file__)), "--benchmark", "pope", "--score-only", "--questions", str(q),
            "--answers", str(a), "--out-json", str(tmp_path / "f.json")]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "of its 3 answers 1 match no question" in done.stderr and "1 of 3 questions have no answer" in done.stderr
    done = subprocess.run(argv + ["--allow-partial"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "normal: PARTIAL, 2 of 3 questions answered" in done.stdout


def test_answers_of_other_weights_are_moved_aside_not_lost(tmp_path):
    """Answering into a file that holds other weights' answers (an earlier model's, or the original's file given
    as --answers) keeps that file whole beside the new one; it used to be rewritten without them."""
    lines = [{"question_id": 1, "text": "yes", "model_id": "other"}, {"question_id": 2, "text": "no", "model_id": "mine"},
             {"question_id": 3, "text": "no", "prompt": "written by the original's model_vqa.py"}]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    before = path.read_bytes()
    assert E.read_answers(path, "mine") == [lines[1]]
    asides = [p for p in tmp_path.iterdir() if p != path]
    assert len(asides) == 1 and asides[0].read_bytes() == before
    assert [json.loads(x) for x in path.read_text().splitlines()] == [lines[1]]
