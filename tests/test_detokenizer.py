import random

import pytest
from transformers import AutoTokenizer

from dspark.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from dspark.models.default import default_model_dir

TRICKY_TEXTS = [
    "Hello, world!",
    "naïve café, déjà vu — Ångström über straße",
    "emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵!",
    "中文测试：你好，世界。日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return {'a': [1, 2]}\n\n\tif  x  >  0 :\n        pass  \n",
    "<|im_start|>assistant\nSure 😀!<|im_end|>\n<|im_start|>user\n谢谢<|im_end|>",
    "   leading spaces and trailing   ",
    "mixed\u00a0nbsp\u200bzero-width and math ∑∫√∞ ≠ ≤",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


def chunked(ids: list[int], rng: random.Random | None) -> list[list[int]]:
    """Split ids one token at a time, or in random chunk sizes when an rng is given."""
    chunks, i = [], 0
    while i < len(ids):
        size = 1 if rng is None else rng.randint(1, 5)
        chunks.append(ids[i : i + size])
        i += size
    return chunks


def stream(tokenizer, ids: list[int], rng=None, prompt_ids=None, skip=True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip)
    deltas = [detok.push(chunk) for chunk in chunked(ids, rng)]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    assert detok.token_ids == ids
    return deltas, tail


@pytest.mark.parametrize("text", TRICKY_TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_streamed_text_matches_full_decode(tokenizer, text: str, skip: bool):
    ids = tokenizer.encode(text)
    expected = tokenizer.decode(ids, skip_special_tokens=skip)
    for rng in [None, random.Random(1), random.Random(2)]:
        deltas, tail = stream(tokenizer, ids, rng, skip=skip)
        assert "".join(deltas) + tail == expected
        assert all("\ufffd" not in d for d in deltas)


def test_multibyte_characters_are_held_back(tokenizer):
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([t]) for t in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert detok.flush() == ""


def test_prompt_context(tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nSay hi 你好<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(" Hi there 😀, 你好!")
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    for rng in [None, random.Random(3)]:
        deltas, tail = stream(tokenizer, ids, rng, prompt_ids=prompt)
        assert "".join(deltas) + tail == expected


def test_prompt_ending_mid_character(tokenizer):
    ids = tokenizer.encode("😀 ok")
    deltas, tail = stream(tokenizer, ids[2:], prompt_ids=ids[:2])
    assert "".join(deltas) + tail == tokenizer.decode(ids[2:])


def test_flush_emits_incomplete_character(tokenizer):
    ids = tokenizer.encode("a😀")[:-1]
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) == "a"
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_random_token_streams(tokenizer):
    # Arbitrary ids (possibly invalid UTF-8 mid-text) must still reproduce the full decode exactly.
    rng = random.Random(4)
    for _ in range(30):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        deltas, tail = stream(tokenizer, ids, rng)
        assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)


# --- stop strings -------------------------------------------------------------------------------------


def reference_cut(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut at the stop string that completes first (generation stops there); longest on a tie."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def run_matcher(deltas: list[str], stop: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopStringMatcher(stop)
    out, stopped = [], False
    for delta in deltas:
        emitted, stopped = matcher.feed(delta)
        out.append(emitted)
        if stopped:
            break
    out.append(matcher.flush())
    return "".join(out), stopped, out


def test_stop_split_across_deltas():
    text, stopped, out = run_matcher(["Hello wo", "rld, ST", "OP here", " more"], ["STOP"])
    assert (text, stopped) == ("Hello world, ", True)
    assert out[1] == "rld, "  # "ST" is held back until it is known not to matter


def test_partial_match_is_released():
    text, stopped, out = run_matcher(["ab", "STO", "X then"], ["STOP"])
    assert (text, stopped) == ("abSTOX then", False)
    assert out[:3] == ["ab", "", "STOX then"]


def test_multiple_stop_strings_first_completed_wins():
    assert run_matcher(["one\n\ntwo END"], ["END", "\n\n"])[:2] == ("one", True)
    assert run_matcher(["x ", "<", "/s", ">"], ["</s>", "\n"])[:2] == ("x ", True)


def test_stop_at_the_very_start():
    assert run_matcher(["STOP and more"], ["STOP"])[:2] == ("", True)
    assert run_matcher(["S", "T", "O", "P"], ["STOP"])[:2] == ("", True)


def test_no_stop_flush_returns_rest():
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xxab") == ("xx", False)
    assert matcher.flush() == "ab"
    assert matcher.flush() == ""


def test_no_stop_strings_passes_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_feed_after_stop():
    matcher = StopStringMatcher(["."])
    assert matcher.feed("Hi. there") == ("Hi", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_matcher_matches_reference_on_random_streams():
    rng = random.Random(5)
    for _ in range(2000):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 25)))
        stop = ["".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text) + 1), k=min(len(text), rng.randint(0, 6))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        got, stopped, _ = run_matcher(deltas, stop)
        assert (got, stopped) == reference_cut(text, stop), (text, stop, deltas)
