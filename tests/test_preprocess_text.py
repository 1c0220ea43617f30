"""Text: token ids identical to the reference's tokenizer; framing; limits; errors."""

from __future__ import annotations

import pytest
import torch
from reference_data_shim import reference_data

import imagebind_core.preprocess as P
from imagebind_core.errors import InvalidInput

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
    with pytest.raises(InvalidInput, match="UTF-8") as e:
        P.preprocess("text", b"caf\xe9 \xff\xfe", item_id="t1")
    assert e.value.item_id == "t1" and e.value.modality == "text"
    with pytest.raises(InvalidInput, match="over the limit"):
        P.preprocess("text", "a" * 101, limits=P.Limits(max_text_chars=100))
    with pytest.raises(InvalidInput, match="expected str"):
        P.preprocess("text", 12345)  # type: ignore[arg-type]
