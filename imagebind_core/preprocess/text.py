"""Text: the CLIP byte-level BPE tokenizer with the reference's cleaning and framing.

Written here rather than imported: OpenCLIP's tokenizer (the maintained home of this
vocabulary) names its special tokens `<start_of_text>`/`<end_of_text>`, so a literal
`<|endoftext|>` in user text would tokenize differently from the reference, and importing
`open_clip` pulls in its whole model zoo. We use OpenCLIP only for the vocabulary *file*
(md5-checked), located without importing the package. The tokenizer is built once per
process and memoises BPE per word, so it runs far faster than the reference, which rebuilds
its tokenizer on every call.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.util
import itertools
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np
import regex

from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.common import DEFAULT_LIMITS, Limits, replace_config

if TYPE_CHECKING:  # torch only where a tensor is returned: the job's text workers never need
    # it (`preprocess_texts` returns numpy), and importing it is most of a new worker's start.
    import torch

logger = logging.getLogger(__name__)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_MD5 = "933b7abbbbde62c36f02f0e6ccde464f"
CONTEXT_LENGTH = 77
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
# Merges used by CLIP: lines 2 .. 49152-256-2+1 of the file (the first line is a header).
NUM_MERGES = 49152 - 256 - 2

# Pre-tokenisation of the reference (case-insensitive): the two special strings, English
# contractions, letter runs, single digits, runs of other non-space symbols.
_PRETOKEN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# The same pre-tokenisation for cleaned text of printable ASCII (lower case, single spaces),
# in Python's own `re`: there a letter is a-z, a number 0-9 and the only space " ", and `re`
# splits such text in half the time `regex` takes with Unicode classes (most captions).
_ASCII_PRETOKEN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+"
)
# A character outside printable ASCII, tab and newline, or an "&": text without one is text
# ftfy.fix_text returns unchanged, so cleaning skips it (ftfy is most of the cost of cleaning a
# short caption). Every fix ftfy makes needs such a character: mojibake, C1 controls,
# ligatures, full-width forms and curly quotes are not ASCII; terminal escapes start with ESC;
# line-break fixes need CR, U+2028 or U+2029; the control characters it drops are other C0
# codes; HTML entities start with "&". tests/test_preprocess_text.py checks it against ftfy.
_FTFY_MAY_CHANGE = re.compile(r"[^\t\n\x20-\x7e]|&")
# Longest vocabulary entry, in byte symbols (checked when the vocabulary is built).
MAX_TOKEN_SYMBOLS = 32
# Pre-tokens longer than this (in byte symbols) are neither memoised nor, when only the first
# few of their tokens can reach the model, merged whole (see `Tokenizer._bpe_prefix`).
LONG_WORD_SYMBOLS = 256
# Tokens of a prefix that end at least this many symbols before the cut are taken as the whole
# word's: a BPE merge only ever joins neighbours, and on every word tried (random letters,
# repeats, symbols, accents, CJK) the prefix's tokens differed from the word's only within the
# last 10 symbols before the cut. Four longest tokens is a wide margin.
PREFIX_MARGIN_SYMBOLS = 4 * MAX_TOKEN_SYMBOLS
# Cleaned texts up to this long are split into all their pre-tokens at once (`Tokenizer.encode`):
# ~200 words at most, against the 75 ids that can reach the model. Longer ones are split word
# by word, and their splitting stops with the ids framing keeps.
SHORT_TEXT_CHARS = 1024
# Bytes of the per-process BPE memo (words and their ids) before it is emptied and refilled.
MEMO_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class TextConfig:
    """Framing of the tokens: context length 77 with SOT first and EOT always kept."""

    context_length: int = CONTEXT_LENGTH


TEXT = TextConfig()


def bpe_vocab_path() -> Path:
    """Path of CLIP's BPE merges file.

    `$IMAGEBIND_BPE_PATH` if set, else the copy shipped by the `open_clip_torch` package
    (found with `importlib.util.find_spec`, which does not import the package).
    """
    env = os.environ.get("IMAGEBIND_BPE_PATH")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "CLIP's BPE vocabulary not found: install `open_clip_torch` (a core dependency) "
            "or set IMAGEBIND_BPE_PATH to bpe_simple_vocab_16e6.txt.gz"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILENAME


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in byte order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...)
    map to code points 256, 257, ... in byte order, so no symbol is whitespace.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


class Tokenizer:
    """CLIP BPE tokenizer, reference-compatible ids (SOT 49406, EOT 49407, pad 0)."""

    def __init__(self, bpe_path: str | os.PathLike[str] | None = None) -> None:
        path = Path(bpe_path) if bpe_path is not None else bpe_vocab_path()
        raw = path.read_bytes()
        digest = hashlib.md5(raw).hexdigest()
        if digest != BPE_MD5:
            raise RuntimeError(f"{path} has md5 {digest}, expected CLIP's vocabulary {BPE_MD5}")
        lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        byte_syms = _byte_symbols()
        # The vocabulary order defines the ids: bytes in the order below, the same with the
        # end-of-word marker, each merge result, then the two specials.
        order = [*byte_syms[0x21:0x7F], *byte_syms[0xA1:0xAD], *byte_syms[0xAE:0x100]]
        order += [s for s in byte_syms if s not in set(order)]
        vocab = order + [s + "</w>" for s in order] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if len(self.encoder) != VOCAB_SIZE or self.encoder[EOT_TOKEN] != EOT_ID:
            raise RuntimeError(f"unexpected CLIP vocabulary built from {path}")
        longest = max(len(t.removesuffix("</w>")) for t in vocab[:-2])
        if longest > MAX_TOKEN_SYMBOLS:
            raise RuntimeError(f"{path}: a token of {longest} symbols; expected <= 32")
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.byte_table = byte_syms
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_bytes = 0
        self._clear_memo()

    def _clear_memo(self) -> None:
        self._cache.clear()
        self._cache.update({SOT_TOKEN: (SOT_ID,), EOT_TOKEN: (EOT_ID,)})
        self._cache_bytes = 0

    def _bpe(self, word: str, limit: int | None = None) -> tuple[int, ...]:
        """Ids of one pre-token, as it appears in the cleaned text.

        Words of up to `LONG_WORD_SYMBOLS` byte symbols are memoised under the word itself
        (`encode` looks them up without a call); the memo holds at most `MEMO_MAX_BYTES`
        (then it starts over). With `limit`, only the first `limit` ids are needed (the rest
        of the word cannot fit in the context): a long word is then merged prefix by prefix
        (`_bpe_prefix`), so its cost does not grow with its length.
        """
        hit = self._cache.get(word)
        if hit is not None:
            return hit if limit is None else hit[:limit]
        sym = self.symbols(word, self.byte_table)
        if len(sym) > LONG_WORD_SYMBOLS:
            if limit is not None:
                return self._bpe_prefix(sym, limit)
            return tuple(self.encoder[p] for p in self._merge([*sym[:-1], sym[-1] + "</w>"]))
        ids = tuple(self.encoder[p] for p in self._merge([*sym[:-1], sym[-1] + "</w>"]))
        size = sys.getsizeof(word) + sys.getsizeof(ids) + 100  # + the dict's slot and hash
        if self._cache_bytes + size > MEMO_MAX_BYTES:
            self._clear_memo()
        self._cache[word] = ids
        self._cache_bytes += size
        return ids if limit is None else ids[:limit]

    def _bpe_prefix(self, word: str, limit: int) -> tuple[int, ...]:
        """The first `limit` ids of a long word, from merging growing prefixes of it.

        A prefix is merged without the end-of-word marker; its tokens that end at least
        `PREFIX_MARGIN_SYMBOLS` before the cut are kept. The prefix doubles until `limit`
        tokens are kept or it covers the word (then the word is merged whole, exactly).
        """
        n = 4 * limit + PREFIX_MARGIN_SYMBOLS
        while n < len(word):
            kept: list[str] = []
            end = 0
            for p in self._merge(list(word[:n])):
                end += len(p)
                if end > n - PREFIX_MARGIN_SYMBOLS or len(kept) == limit:
                    break
                kept.append(p)
            if len(kept) == limit:
                return tuple(self.encoder[p] for p in kept)
            n *= 2
        parts = self._merge([*word[:-1], word[-1] + "</w>"])
        return tuple(self.encoder[p] for p in parts[:limit])

    def _merge(self, parts: list[str]) -> list[str]:
        """The reference's BPE loop over `parts` (symbols, the last one may carry `</w>`)."""
        ranks = self.ranks
        while len(parts) > 1:
            # Merge the lowest-ranked adjacent pair everywhere it occurs, left to right.
            best = None
            best_rank = None
            for pair in itertools.pairwise(parts):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            n = len(parts)
            while i < n:
                if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    @staticmethod
    def clean(text: str) -> str:
        """The reference's cleaning: ftfy, HTML-unescape twice, collapse whitespace, lower."""
        if text.isascii() and text.isprintable() and "&" not in text:
            # ftfy and unescaping leave such text as it is, and its one whitespace is " ".
            return " ".join(text.split()).lower()
        if _FTFY_MAY_CHANGE.search(text) is not None:
            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return _WHITESPACE.sub(" ", text).strip().lower()

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BPE ids of `text` after cleaning, without SOT/EOT.

        With `max_tokens`, stops after the first `max_tokens` ids (the same ids as the full
        encoding's first ones): framing keeps no more, and the work is then bounded by the
        context length instead of the text's length.
        """
        memo = self._cache
        text = self.clean(text)
        pretoken = _ASCII_PRETOKEN if text.isascii() and text.isprintable() else _PRETOKEN
        if max_tokens is None or len(text) <= SHORT_TEXT_CHARS:
            # Most captions: every pre-token memoised. One `findall` and one lookup per word,
            # not a match object and a bounds check each.
            hits = list(map(memo.get, pretoken.findall(text)))
            if None not in hits:
                ids = list(itertools.chain.from_iterable(hits))
                return ids if max_tokens is None else ids[:max_tokens]
        ids: list[int] = []
        for tok in pretoken.finditer(text):
            left = None if max_tokens is None else max_tokens - len(ids)
            if left is not None and left <= 0:
                break
            word = tok.group()
            hit = memo.get(word)  # most words: memoised, no call (see `_bpe`)
            if hit is None:
                ids.extend(self._bpe(word, left))
            else:
                ids.extend(hit if left is None else hit[:left])
        return ids

    @staticmethod
    def symbols(word: str, table: Sequence[str]) -> str:
        """`word`'s UTF-8 bytes as byte symbols (`table`: `_byte_symbols()`). Printable ASCII
        but space (0x21-0x7E) is its own symbol: such a word, as most pre-tokens of English
        captions are, is returned as it is, without a lookup per byte."""
        if word.isascii() and word.isprintable() and " " not in word:
            return word
        return "".join(table[b] for b in word.encode("utf-8"))

    def frame(self, ids: Sequence[int], context_length: int = CONTEXT_LENGTH) -> list[int]:
        """[SOT] + ids, cut to context_length - 1, then [EOT]: EOT survives truncation."""
        return [*[SOT_ID, *ids][: context_length - 1], EOT_ID]


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer, built on first use (about 0.1 s) and reused."""
    return Tokenizer()


def check_text(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    """`text` as a checked `str`: bytes must be UTF-8; length within `limits.max_text_chars`."""
    if isinstance(text, bytes | bytearray | memoryview):
        if len(text) > 4 * limits.max_text_chars:
            raise InvalidInput(
                "text",
                f"text is {len(text)} bytes: more than the limit of {limits.max_text_chars} "
                f"characters can take in UTF-8 ({4 * limits.max_text_chars} bytes)",
            )
        try:
            # "utf-8" and a BOM dropped by hand: the "utf-8-sig" codec is Python code, a
            # microsecond a call. Error positions count from the first byte, BOM included.
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(
                "text", f"text is not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
        if text.startswith("\ufeff"):  # the bytes began with a UTF-8 BOM
            text = text[1:]
    if not isinstance(text, str):
        raise InvalidInput("text", f"expected str or UTF-8 bytes, got {type(text).__name__}")
    if len(text) > limits.max_text_chars:
        raise InvalidInput(
            "text", f"text has {len(text)} characters, over the limit of {limits.max_text_chars}"
        )
    return text


def tokenize(
    texts: str | Sequence[str],
    cfg: TextConfig = TEXT,
    limits: Limits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Token ids of one or more texts: always a 2-D LongTensor (N, 77), zero-padded.

    Same ids as the reference's `SimpleTokenizer`: cleaned with ftfy + double HTML unescape +
    whitespace collapse + lower case; a literal `<|endoftext|>` in the text becomes id 49407;
    texts longer than 75 BPE tokens are cut and still end with EOT.
    """
    import torch

    if isinstance(texts, str | bytes):
        texts = [texts]
    return torch.from_numpy(_token_matrix([check_text(t, limits) for t in texts], cfg))


def _token_matrix(texts: Sequence[str], cfg: TextConfig) -> np.ndarray:
    tok = get_tokenizer()
    width = cfg.context_length
    # SOT + at most context_length - 2 ids + EOT: no id after those can reach the model.
    rows = [tok.frame(tok.encode(t, max(0, width - 2)), width) for t in texts]
    out = np.zeros((len(rows), width), np.int64)
    if len(rows) < 16:  # a request's few texts: the mask below costs more than it saves
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = ids
        return out
    # A block's ids at once, in row order: one copy, not a numpy assignment per text.
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    flat = itertools.chain.from_iterable(rows)
    out[np.arange(width) < lengths[:, None]] = np.fromiter(flat, np.int64, int(lengths.sum()))
    return out


def preprocess_texts(
    texts: Sequence[str | bytes | None],
    *,
    limits: Limits = DEFAULT_LIMITS,
    item_ids: Sequence[str | None] | None = None,
    **options: object,
) -> tuple[np.ndarray, dict[int, InvalidInput]]:
    """Many texts at once (the offline job's blocks): (n, context_length) int64 token ids,
    row i equal to `preprocess("text", texts[i], **options)`, and {i: InvalidInput} for the
    texts that fail (their rows stay zero; a None text is skipped the same way, without an
    entry). One numpy matrix instead of a tensor per text: a caption costs the tokenizer,
    little more."""
    cfg = replace_config(TEXT, options, "text")
    errors: dict[int, InvalidInput] = {}
    good: list[int] = []
    checked: list[str] = []
    for i, t in enumerate(texts):
        if t is None:
            continue
        try:
            checked.append(check_text(t, limits))
            good.append(i)
        except InvalidInput as e:
            errors[i] = e.with_id(item_ids[i] if item_ids is not None else None)
    out = np.zeros((len(texts), cfg.context_length), np.int64)
    if good:
        out[good] = _token_matrix(checked, cfg)
    return out, errors


def preprocess_text(
    text: str | bytes, cfg: TextConfig = TEXT, limits: Limits = DEFAULT_LIMITS
) -> torch.Tensor:
    """One text (str or UTF-8 bytes) -> (77,) int64 token ids."""
    return tokenize([check_text(text, limits)], cfg, limits)[0]


def text_from_data(
    data: str | bytes, limits: Limits = DEFAULT_LIMITS, **options: object
) -> torch.Tensor:
    """`preprocess("text", data)`: a str or UTF-8 bytes -> (77,) int64."""
    return preprocess_text(data, replace_config(TEXT, options, "text"), limits)
