"""Text: token ids identical to the reference's tokenizer; framing; limits; errors."""

from __future__ import annotations

import pytest
import torch
from reference_data_shim import reference_data

import imagebind_core.preprocess as P
from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.text import check_text

TEXTS = [
    "",
    "a photo of a dog",
    "A Dog.",
    "  Lots   of\twhite\nspace  ",
    "It's we'll they've I'm you'd she'll don't",
    "numbers 12345 and 3.14159, 1e-9",
    "HTML: &amp; &lt;b&gt; &amp;amp; &quot;quoted&quot; &#39;x&#39; &eacute;",
    "unicode: naïve café résumé Ærøskøbing Straße İstanbul ǅ",
    "中文文本和日本語のテキストと한국어",
    "emoji 😀🐶🚗 👩‍👩‍👧 🇫🇷 ❤️",
    "mojibake: The Mona Lisa doesnâ€™t have eyebrows.",
    "special <|endoftext|> in the middle and <|startoftext|> too",
    "UPPER <|ENDOFTEXT|> case special",
    "symbols !!!??? ... --- *** @#$%^&()[]{}",
    "word " * 200,  # far beyond 75 BPE tokens: EOT must survive
    "x" * 3000,
    "\u200b zero\u00a0width and nbsp \ufeff bom",
]


def test_token_ids_identical_to_reference() -> None:
    ref = reference_data().load_and_transform_text(TEXTS, "cpu")
    ours = P.tokenize(TEXTS)
    assert ours.dtype == torch.int64 and ours.shape == (len(TEXTS), 77)
    for i, t in enumerate(TEXTS):
        assert torch.equal(ours[i], ref[i]), f"text {i} {t[:40]!r}: {ours[i]} != {ref[i]}"


def test_framing_and_truncation() -> None:
    empty = P.preprocess("text", "")
    assert empty.tolist()[:3] == [49406, 49407, 0] and empty.shape == (77,)
    long = P.preprocess("text", "word " * 200)
    assert long[0] == 49406 and long[76] == 49407 and (long[1:76] != 0).all()
    # the tokenizer is built once and reused
    assert P.get_tokenizer() is P.get_tokenizer()
    # 2-D always; single str accepted
    assert P.tokenize("a dog").shape == (1, 77)


def test_bytes_input_and_limits() -> None:
    assert torch.equal(P.preprocess("text", "café".encode()), P.preprocess("text", "café"))
    # A UTF-8 BOM at the start of bytes is dropped, once, as the "utf-8-sig" codec drops it;
    # a str keeps its characters.
    bom = "\ufeff".encode()
    for data, same in [(bom + "café".encode(), "café"), (bom + bom + b"x", "\ufeffx")]:
        assert check_text(data) == same
        assert torch.equal(P.preprocess("text", data), P.preprocess("text", same))
    assert check_text("\ufeffx") == "\ufeffx"
    with pytest.raises(InvalidInput, match="at byte 4"):
        P.preprocess("text", bom + b"a\xff")
    with pytest.raises(InvalidInput, match="UTF-8") as e:
        P.preprocess("text", b"caf\xe9 \xff\xfe", item_id="t1")
    assert e.value.item_id == "t1" and e.value.modality == "text"
    with pytest.raises(InvalidInput, match="over the limit"):
        P.preprocess("text", "a" * 101, limits=P.Limits(max_text_chars=100))
    with pytest.raises(InvalidInput, match="expected str"):
        P.preprocess("text", 12345)  # type: ignore[arg-type]


def test_cleaning_skips_ftfy_only_where_ftfy_changes_nothing() -> None:
    """Cleaning leaves out ftfy for text in which no ftfy fix can apply (printable ASCII, tab,
    newline, no "&"): on random strings over all of ASCII and the characters ftfy fixes, the
    cleaned text equals the cleaning with ftfy always applied, and the shortcut is taken."""
    import html
    import random

    import ftfy

    from imagebind_core.preprocess.text import _WHITESPACE, Tokenizer

    def with_ftfy(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return _WHITESPACE.sub(" ", text).strip().lower()

    rng = random.Random(7)
    ascii_chars = [chr(c) for c in range(128)]
    fixable = ["\u2019", "\ufb01", "Ã©", "\x85", "\u2028", "\uff21", "&amp;", "&lt;", "\x1b[31m"]
    printable = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n"]
    shortcut = 0
    for i in range(20000):
        pool = (printable, ascii_chars, ascii_chars + fixable)[i % 3]
        s = "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))
        assert Tokenizer.clean(s) == with_ftfy(s), repr(s)
        shortcut += s.isprintable() and "&" not in s
    assert shortcut > 5000  # the shortcut was exercised, not only the ftfy path
    for s in TEXTS:
        assert Tokenizer.clean(s) == with_ftfy(s), repr(s)


def test_ascii_pre_tokens_skip_the_byte_mapping_with_the_same_ids() -> None:
    """A printable ASCII word is its own byte-symbol string, so `Tokenizer.symbols` skips the
    byte mapping for it: every ASCII character (controls and space map elsewhere) and mixed
    words map as byte by byte, and on random strings over all of ASCII and non-ASCII letters
    `encode` gives the ids of mapping every pre-token's UTF-8 bytes."""
    import random

    from imagebind_core.preprocess.text import _PRETOKEN, _byte_symbols

    tok = P.get_tokenizer()
    symbols = _byte_symbols()
    for word in [chr(c) for c in range(128)] + ["a b", "ok\x7f", "tab\there", "é", "x😀", "A!~"]:
        assert tok.symbols(word, symbols) == "".join(symbols[b] for b in word.encode()), word

    def mapped(text: str) -> list[int]:
        # Every pre-token mapped byte by byte and merged whole: no shortcut, no memo.
        ids: list[int] = []
        for m in _PRETOKEN.finditer(tok.clean(text)):
            sym = "".join(symbols[b] for b in m.group().encode("utf-8"))
            if sym in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(tok.encoder[sym])
                continue
            ids.extend(tok.encoder[p] for p in tok._merge([*sym[:-1], sym[-1] + "</w>"]))
        return ids

    rng = random.Random(11)
    pool = [chr(c) for c in range(128)] + list("éßİ中😀\u00a0\u200b")
    for _trial in range(3000):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        assert tok.encode(s) == mapped(s), repr(s)
    for s in TEXTS:
        assert tok.encode(s) == mapped(s), repr(s[:40])


def test_printable_ascii_takes_the_stdlib_pre_tokenizer_with_the_same_splits() -> None:
    """Cleaned printable ASCII is split by `_ASCII_PRETOKEN` (Python's `re`), everything else
    by `_PRETOKEN` (`regex`, Unicode classes): on random printable ASCII strings rich in the
    pattern's special cases, both split the cleaned text into the same pre-tokens, and
    `encode` (which takes the shortcut for them) gives the ids of the `regex` split."""
    import random

    from imagebind_core.preprocess.text import _ASCII_PRETOKEN, _PRETOKEN

    tok = P.get_tokenizer()
    pieces = [chr(c) for c in range(0x20, 0x7F)] + [
        "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "'s", "'S", "'t",
        "'re", "'ve", "'m", "'ll", "'LL", "'d", "''", "word", "Dog", "42", "  ", "&", "&amp;",
    ]  # fmt: skip
    rng = random.Random(5)
    fast = 0
    for _trial in range(5000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        clean = tok.clean(s)
        assert _ASCII_PRETOKEN.findall(clean) == _PRETOKEN.findall(clean), repr(s)
        regex_ids = [i for w in _PRETOKEN.findall(clean) for i in tok._bpe(w)]
        assert tok.encode(s) == regex_ids, repr(s)
        fast += clean.isascii() and clean.isprintable()
    assert fast > 4000  # the shortcut was exercised


def test_many_texts_at_once_equal_one_at_a_time() -> None:
    """`preprocess_texts` (the job's blocks) gives each text the ids `preprocess` gives it,
    and reports a bad text by index, with its id, leaving the others untouched."""
    import numpy as np

    from imagebind_core.preprocess.common import Limits

    limits = Limits(max_text_chars=100)
    texts: list = [*TEXTS[:14], b"\xff\xfe not utf-8", "y" * 101, None, "ok"]
    ids = [f"t{i}" for i in range(len(texts))]
    matrix, errors = P.preprocess_texts(texts, limits=limits, item_ids=ids)
    assert matrix.dtype == np.int64 and matrix.shape == (len(texts), 77)
    assert sorted(errors) == [14, 15]
    assert "t14" in str(errors[14]) and "UTF-8" in errors[14].reason
    assert "over the limit" in errors[15].reason
    for i, t in enumerate(texts):
        if i in errors or t is None:
            assert not matrix[i].any()
            continue
        want = P.preprocess("text", t, limits=limits).numpy()
        np.testing.assert_array_equal(matrix[i], want)
    short, _ = P.preprocess_texts(["a dog"], context_length=8)
    assert short.shape == (1, 8)
    # A block (16 texts or more) fills its matrix in one copy: the same rows, also cut short.
    block = [*TEXTS, *TEXTS[::-1]]
    for width in (77, 8):
        matrix, errors = P.preprocess_texts(block, context_length=width)
        assert not errors and len(block) >= 16 and matrix.shape == (len(block), width)
        for i, t in enumerate(block):
            want = P.preprocess("text", t, context_length=width).numpy()
            np.testing.assert_array_equal(matrix[i], want, err_msg=repr(t[:40]))
