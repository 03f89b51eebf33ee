"""Incremental detokenization: whole UTF-8 characters only, stop strings never leak."""

import pytest

from ropeway.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Plain ASCII words, then numbers 12345.",
    "Emoji 🚀🔥 and CJK 東京タワー and accents café naïve",
    "Mixed: 🤖 robots say 你好 to everyone\n\n- item one\n- item two",
]


def stream(tokenizer, ids, stop=(), include_stop=False):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt:"), list(stop), include_stop, True)
    deltas = []
    for token in ids:
        detok.append(token)
        deltas.append(detok.release(finished=False))
        if detok.stop_reason is not None:
            break
    deltas.append(detok.release(finished=True))
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_add_up(default_llm, text):
    tokenizer = default_llm.tokenizer
    ids = tokenizer.encode(text)
    # Multi-byte characters really are split across byte-level tokens here.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids) or text.isascii()
    deltas, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


@pytest.mark.parametrize("stop", ["item two", "タワー", "\n\n", "🔥"])
def test_stop_strings_cut_the_text_and_never_leak(default_llm, stop):
    tokenizer = default_llm.tokenizer
    text = next(t for t in TEXTS if stop in t)
    deltas, detok = stream(tokenizer, tokenizer.encode(text), stop=[stop])
    expected = text[: text.index(stop)]
    assert detok.stop_reason == stop
    assert "".join(deltas) == expected
    released = ""
    for delta in deltas:
        released += delta
        assert expected.startswith(released)  # never a character that is later taken back


def test_stop_string_kept_when_asked(default_llm):
    tokenizer = default_llm.tokenizer
    deltas, _ = stream(tokenizer, tokenizer.encode(TEXTS[0]), stop=["numbers"], include_stop=True)
    assert "".join(deltas) == "Plain ASCII words, then numbers"


def test_first_token_keeps_its_leading_space(default_llm):
    tokenizer = default_llm.tokenizer
    deltas, _ = stream(tokenizer, tokenizer.encode(" hello world"))
    assert "".join(deltas) == " hello world"
