"""CLIP/tokenizer.py: token-for-token parity with open_clip's copy of OpenAI's tokenizer, packing,
and one-line errors for a missing or corrupt merges file."""
from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from CLIP import tokenizer as tok
from CLIP.errors import TokenizerError
from CLIP.tokenizer import (
    BPE_SHA256,
    CONTEXT_LENGTH,
    DEFAULT_BPE_PATH,
    EOT_TOKEN,
    SOT_TOKEN,
    SimpleTokenizer,
    default_tokenizer,
    tokenize,
)

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

LONG_TEXT = " ".join(f"word{i} and more words" for i in range(40))  # ~200 tokens

CORPUS = [
    "",
    "   ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "Héllo wörld, café naïve résumé façade",
    "Ærøskøbing Œuvre ß straße İstanbul",
    "中文字符 日本語のテキスト 한국어",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇩🇪",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39;",
    "double escaped &amp;lt; and &amp;amp; and &amp;gt;",
    "numbers 123 4.56 7,890 -12 1e10 ½ ² ٣",
    "punctuation!!! ??? ... --- ;;; :-) (((nested))) [x] {y} <z> @#$%^&*",
    "tabs\tand\t\tnewlines\n\n\nand   spaces \r\n end  ",
    "it's don't they're we've I'm you'll he'd",
    "IT'S DON'T THEY'RE",
    "curly ’quotes’ and “double” ones",
    "mojibake: â€œquotedâ€\x9d and Ã©",
    "zero\u200bwidth and non\u00a0breaking and soft\u00adhyphen",
    "a damaged Chest X-ray film with defect.",
    "this is one histopathological image in the scene.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "control \x00\x01\x7f chars",
]

NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage"]
ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = [
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
    "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
]
OBJECTS = ["Brain", "Liver", "retinal OCT", "Chest X-ray film", "histopathological image"]


@pytest.fixture(scope="module")
def ours() -> SimpleTokenizer:
    return default_tokenizer()


@pytest.fixture(scope="module")
def ref():
    return open_clip_tokenizer.SimpleTokenizer()


def test_constants_and_special_ids(ours: SimpleTokenizer) -> None:
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (49406, 49407, 49408)
    assert CONTEXT_LENGTH == 77
    assert Path(DEFAULT_BPE_PATH).parent == Path(tok.__file__).resolve().parent
    assert ours.encode(SOT_TOKEN) == [49406] and ours.encode(EOT_TOKEN) == [49407]


def test_vocabulary_matches_reference(ours: SimpleTokenizer, ref) -> None:
    assert tok.bytes_to_unicode() == open_clip_tokenizer.bytes_to_unicode()
    assert ours.decoder[:49406] == [ref.decoder[i] for i in range(49406)]
    assert ours.bpe_ranks == ref.bpe_ranks


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_reference(ours: SimpleTokenizer, ref, text: str) -> None:
    assert ours.encode(text) == ref.encode(text)


def test_tokenize_matches_reference_on_corpus() -> None:
    ours_rows = tokenize(CORPUS)
    assert ours_rows.dtype == torch.long and ours_rows.shape == (len(CORPUS), 77)
    assert torch.equal(ours_rows, open_clip_tokenizer.tokenize(CORPUS))


def test_tokenize_matches_reference_on_release_prompts() -> None:
    states = NORMAL_STATES + ABNORMAL_STATES
    sentences = [t.format(s.format(o)) for o in OBJECTS for s in states for t in TEMPLATES]
    assert "a photo of a damaged Chest X-ray film." in sentences
    assert torch.equal(tokenize(sentences), open_clip_tokenizer.tokenize(sentences))


def test_single_string_and_custom_context_length() -> None:
    row = tokenize("a photo of a cat")
    assert row.shape == (1, 77)
    assert row[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert row[0, 7:].eq(0).all()
    assert torch.equal(tokenize(["a", "b c"], context_length=16), open_clip_tokenizer.tokenize(["a", "b c"], 16))
    assert tokenize([]).shape == (0, 77)


def test_special_tokens_inside_text(ours: SimpleTokenizer, ref) -> None:
    # OpenAI's markers are <|startoftext|>/<|endoftext|>; open_clip renamed them <start_of_text>/<end_of_text>
    # (same ids). Ours follows OpenAI / METHOD.md, so compare against open_clip with the names swapped.
    for text in ["a <|startoftext|> b", "x<|endoftext|>y", "<|StartOfText|> CAPS <|ENDOFTEXT|>",
                 "<|endoftext|><|endoftext|>", "no < | endoftext | > here"]:
        swapped = text.lower().replace(SOT_TOKEN, "<start_of_text>").replace(EOT_TOKEN, "<end_of_text>")
        assert ours.encode(text) == ref.encode(swapped), text
    # open_clip's own marker names are plain text to OpenAI's tokenizer.
    assert ours.encode("<start_of_text>") == ref.encode("< start _ of _ text >")
    assert ours.encode("a <|endoftext|> b").count(49407) == 1


def test_too_long_raises_unless_truncated() -> None:
    n_tokens = len(default_tokenizer().encode(LONG_TEXT)) + 2
    assert n_tokens > 77
    with pytest.raises(TokenizerError) as info:
        tokenize(["short", LONG_TEXT])
    message = str(info.value)
    assert "\n" not in message and LONG_TEXT[:60] in message and str(n_tokens) in message and "77" in message
    rows = tokenize(["short", LONG_TEXT], truncate=True)
    assert rows[1, -1].item() == 49407 and rows[1].ne(0).all()
    assert torch.equal(rows, open_clip_tokenizer.tokenize(["short", LONG_TEXT]))
    assert torch.equal(tokenize(LONG_TEXT, context_length=10, truncate=True),
                       open_clip_tokenizer.tokenize(LONG_TEXT, context_length=10))


def test_exactly_full_row_is_not_an_error(ours: SimpleTokenizer) -> None:
    text = " ".join(["cat"] * 75)
    row = tokenize(text)
    assert row[0, 0].item() == 49406 and row[0, -1].item() == 49407 and row[0, 1:-1].eq(2368).all()
    with pytest.raises(TokenizerError):
        tokenize(text + " cat")


@pytest.mark.parametrize("text", ["a photo of a cat", "flawless brain without defect", "the quick brown fox"])
def test_decode_round_trip(ours: SimpleTokenizer, ref, text: str) -> None:
    ids = ours.encode(text)
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids).strip() == text
    assert ours.decode(torch.tensor(ids)).strip() == text


def test_default_file_sha256() -> None:
    assert hashlib.sha256(Path(DEFAULT_BPE_PATH).read_bytes()).hexdigest() == BPE_SHA256


def test_default_file_with_wrong_hash_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tok, "BPE_SHA256", "0" * 64)
    with pytest.raises(TokenizerError, match="sha256") as info:
        SimpleTokenizer()
    assert DEFAULT_BPE_PATH in str(info.value) and "\n" not in str(info.value)


def test_copy_of_the_file_elsewhere_loads(tmp_path: Path, ref) -> None:
    copy = tmp_path / "merges.txt.gz"
    shutil.copyfile(DEFAULT_BPE_PATH, copy)
    assert SimpleTokenizer(str(copy)).encode(CORPUS[5]) == ref.encode(CORPUS[5])


def _gzip_lines(lines: list[str]) -> bytes:
    return gzip.compress("\n".join(lines).encode("utf-8"))


def _merges() -> list[str]:
    return gzip.decompress(Path(DEFAULT_BPE_PATH).read_bytes()).decode("utf-8").split("\n")[: 48894 + 1]


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("garbage.gz", lambda: b"\x00\xffnot a gzip file at all" * 10, "gzip"),
        ("truncated.gz", lambda: Path(DEFAULT_BPE_PATH).read_bytes()[:50_000], "gzip"),
        ("few.gz", lambda: _gzip_lines(_merges()[:1001]), "1000 merge lines"),
        ("noheader.gz", lambda: _gzip_lines(_merges()[1:] + ["x y"]), "version"),
        ("badline.gz", lambda: _gzip_lines(_merges()[:500] + ["a b c"] + _merges()[501:]), "line 501"),
        ("notutf8.gz", lambda: gzip.compress(b"#version: 0.2\n\xff\xfe x\n"), "UTF-8"),
    ],
)
def test_corrupt_merges_file_names_the_path(tmp_path: Path, name: str, make, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(TokenizerError) as info:
        SimpleTokenizer(str(path))
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_missing_merges_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt.gz"
    with pytest.raises(TokenizerError) as info:
        SimpleTokenizer(str(path))
    assert str(path) in str(info.value)
