"""chat.TextStream, which every front end streams through: whole characters, stop strings cut where they begin and
held back while they might be beginning, what was held sent once the answer ends another way."""
import torch

from chat import TextStream
from data import Tokenizer


def run(tok, text, stop, eos=True, limit=None):
    """Feed text's tokens (then EOS) one at a time, as generate does; (deltas, final text, finish reason)."""
    deltas = []
    stream = TextStream(tok, deltas.append, stop)
    ids = tok.encode(text, bos=False) + ([tok.eos_id] if eos else [])
    for i, t in enumerate(ids[:limit]):
        if stream(torch.tensor([t])):
            break
    return deltas, stream.finish(), stream.finish_reason


def test_stop_strings_and_what_is_held_back(fixtures):
    tok = Tokenizer(fixtures / "video")
    # a stop string in the text: the answer ends where it begins, and nothing after it is ever sent
    deltas, text, why = run(tok, "one two three four", ["three"])
    assert text.strip() == "one two" and why == "stop" and "".join(deltas) == text and "thr" not in text
    # the text ends (EOS) with what could have begun a stop string: it is sent at the end, not lost
    deltas, text, why = run(tok, "one two thr", ["three"])
    assert text.strip() == "one two thr" and why == "stop" and "".join(deltas) == text
    # no EOS: the length limit ends it, held text sent too
    deltas, text, why = run(tok, "one two thr", ["three"], eos=False)
    assert text.strip() == "one two thr" and why == "length" and "".join(deltas) == text
    # no stop strings: every token's text goes out as it comes
    deltas, text, why = run(tok, "one two", [])
    assert text.strip() == "one two" and why == "stop" and len(deltas) >= 2
