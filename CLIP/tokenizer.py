"""OpenAI CLIP's byte-level BPE tokenizer (METHOD.md section 1, "Tokenizer").

Texts are cleaned (ftfy, HTML unescaped twice, whitespace collapsed, lowercased), split into words
by a fixed pattern, each word's UTF-8 bytes are mapped to printable characters and merged by the
ranked pairs of ``bpe_simple_vocab_16e6.txt.gz``. ``tokenize`` packs texts into rows
``<|startoftext|> tokens <|endoftext|> 0 ...`` of length 77.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import html
import zlib
from collections.abc import Iterable
from pathlib import Path

import ftfy
import regex
import torch

from CLIP.errors import TokenizerError

DEFAULT_BPE_PATH = str(Path(__file__).resolve().with_name("bpe_simple_vocab_16e6.txt.gz"))
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
NUM_MERGES = 48894  # lines 1..48894 after the version header: 49408 - 256 - 256 - 2
END_OF_WORD = "</w>"
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, in vocabulary order (ids 0..255).

    The 188 printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') come first and map to themselves;
    the other 68 bytes (controls, space, soft hyphen...) follow in byte order as chr(256), chr(257)...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + offset) for offset, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """ftfy fix_text, HTML unescape twice, strip, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _read_merges(path: str) -> list[tuple[str, str]]:
    """The 48894 merge pairs of a merges file; TokenizerError (one line, naming the file) otherwise."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TokenizerError(f"BPE merges file {path}: cannot be read ({exc.strerror or exc})") from None
    if Path(path).resolve() == Path(DEFAULT_BPE_PATH):
        digest = hashlib.sha256(raw).hexdigest()
        if digest != BPE_SHA256:
            raise TokenizerError(
                f"BPE merges file {path}: sha256 {digest} does not match the expected {BPE_SHA256}; "
                "re-copy it from the repository"
            )
    try:
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error) as exc:
        raise TokenizerError(f"BPE merges file {path}: not a readable gzip file ({exc})") from None
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"BPE merges file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if "#version" not in lines[0]:
        raise TokenizerError(f"BPE merges file {path}: line 1 is not a '#version' header (got {lines[0][:40]!r})")
    body = lines[1 : NUM_MERGES + 1]
    if len(body) < NUM_MERGES:
        raise TokenizerError(f"BPE merges file {path}: has {len(body)} merge lines, expected at least {NUM_MERGES}")
    merges = []
    for number, line in enumerate(body, start=2):
        pair = line.split()
        if len(pair) != 2:
            raise TokenizerError(
                f"BPE merges file {path}: line {number} is not two space-separated symbols (got {line[:40]!r})"
            )
        merges.append((pair[0], pair[1]))
    return merges


class SimpleTokenizer:
    """Byte-level BPE with OpenAI CLIP's vocabulary: 256 bytes, 256 bytes + '</w>', 48894 merges,
    then <|startoftext|> (49406) and <|endoftext|> (49407)."""

    def __init__(self, bpe_path: str = DEFAULT_BPE_PATH) -> None:
        merges = _read_merges(str(bpe_path))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: b for b, char in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        if len(self.encoder) != len(vocab):
            raise TokenizerError(f"BPE merges file {bpe_path}: merges produce duplicate vocabulary entries")
        self.decoder = vocab
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        self.pattern = regex.compile(SPLIT_PATTERN, regex.IGNORECASE)
        # Per-instance cache of word -> BPE symbols (bounded; a word's merges never change).
        self.bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge a byte-encoded word's symbols, always the adjacent pair of lowest rank first."""
        if word in (SOT_TOKEN, EOT_TOKEN):
            return (word,)
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, NUM_MERGES))
            if best not in ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text (no start/end markers)."""
        ids: list[int] = []
        for word in self.pattern.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped))
        return ids

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of token ids; each end of word becomes a space (so the result ends with one)."""
        chars = []
        for token in tokens:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise TokenizerError(f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})")
            chars.append(self.decoder[token])
        data = bytes(self.byte_decoder[c] for c in "".join(chars))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> SimpleTokenizer:
    """The tokenizer of the bundled merges file, built on first use."""
    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False) -> torch.LongTensor:
    """Rows of SOT + tokens + EOT, zero padded: LongTensor [len(texts), context_length].

    A text longer than ``context_length`` raises TokenizerError, unless ``truncate`` is set; then its
    row keeps the first ``context_length`` tokens and ends with EOT.
    """
    if context_length < 2:
        raise TokenizerError(f"context length {context_length} leaves no room for the start and end tokens")
    if isinstance(texts, str):
        texts = [texts]
    tok = default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
        if len(ids) > context_length:
            if not truncate:
                raise TokenizerError(
                    f"text {text[:60]!r} is {len(ids)} tokens long with its start and end tokens, "
                    f"more than the context length {context_length}; shorten it or pass truncate=True"
                )
            ids = ids[:context_length]
            ids[-1] = tok.eot_token_id
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result
