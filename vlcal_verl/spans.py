"""The vision span: which response tokens carry z_vis, found on token ids.

VCE averages KL_t and H_t over the tokens of z_vis, and TAR reweights exactly those tokens, so the span
must be exact. Decoding the response and re-encoding a prefix is both slow and wrong (BPE merges across
the cut differ from the rollout's tokens). Instead, with a byte-level BPE tokenizer (Qwen2/2.5/3, GPT-2
family) every token id stands for a fixed byte string, so the response bytes are the concatenation of
its tokens' bytes. We find the tags in those bytes (same whitespace tolerance as
:func:`vlcal_verl.protocol.vision_char_span`) and bisect the cumulative byte lengths to token indices.
A tag split across tokens, a multi-byte character split across tokens, or ``>`` merged with the
following text are all handled because nothing ever looks at token boundaries except the bisection.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlcal_verl.protocol import WS, ParsedResponse, parse_response

_WS_B = WS.encode()
VISION_OPEN_B = re.compile(b"<" + _WS_B + b"vision" + _WS_B + b">")
VISION_CLOSE_B = re.compile(b"<" + _WS_B + b"/" + _WS_B + b"vision" + _WS_B + b">")

_running_sum = np.add.accumulate
_TABLES: weakref.WeakKeyDictionary[Any, _ByteTable] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _ByteTable:
    """Every token's bytes: ``pieces[id]``, and the same as one flat uint8 buffer for numpy gathers.

    ``pieces`` has one extra, empty entry at index V that stands in for out-of-vocabulary ids.
    """

    pieces: list[bytes]
    lengths: np.ndarray  # [V+1] int64
    flat: np.ndarray  # [sum(lengths)] uint8
    # [V+1] int64 whose two int32 halves are (offset of the first byte, offset of the last byte) of the
    # token in ``flat`` (last = first − 1 for an empty token): one 8-byte element per token, so a
    # response's gather is a single 1-D take touching one cache line per token
    spans64: np.ndarray


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character → byte."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes_table(tokenizer) -> tuple[list[bytes], np.ndarray]:
    """(id → bytes, id → byte length [V+1]) for a byte-level BPE tokenizer; cached per tokenizer object.

    Added tokens (``<think>``, ``<|im_end|>`` …) map to the UTF-8 of their content. Raises ValueError
    for a tokenizer that is not byte-level (e.g. SentencePiece), whose tokens are not fixed bytes.
    """
    table = _byte_table(tokenizer)
    return table.pieces, table.lengths


def _byte_table(tokenizer) -> _ByteTable:
    try:
        return _TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    decoder = _byte_decoder()
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    size = max(len(tokenizer), max(added, default=-1) + 1)
    pieces: list[bytes] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if i in added:
            pieces.append(added[i].encode("utf-8"))
        elif piece is None:
            pieces.append(b"")
        else:
            try:
                pieces.append(bytes(decoder[ch] for ch in piece))
            except KeyError:
                raise ValueError(
                    f"tokenizer is not byte-level BPE (token {i} = {piece!r}); vision_token_span "
                    "needs a tokenizer whose ids map to fixed bytes (Qwen2/2.5/3, GPT-2 family)"
                ) from None
    pieces.append(b"")  # index V: out-of-vocabulary ids
    lengths = np.array([len(b) for b in pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    pairs = np.stack([starts, starts + lengths - 1], axis=1).astype(np.int32)
    table = _ByteTable(pieces, lengths, flat, np.ascontiguousarray(pairs).view(np.int64).reshape(-1))
    with contextlib.suppress(TypeError):  # not weak-referenceable: rebuilt next time
        _TABLES[tokenizer] = table
    return table


def _as_array(ids: Sequence[int] | Any) -> np.ndarray:
    """Response ids as a 1-D int64 array (torch tensors and numpy arrays without a Python loop)."""
    if hasattr(ids, "detach"):  # torch tensor
        try:
            ids = ids.numpy()  # a CPU tensor of ids: no copy (ids never require grad)
        except (RuntimeError, TypeError):
            ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        arr = ids.astype(np.int64, copy=False)
    else:
        try:
            arr = np.fromiter(ids, dtype=np.int64, count=len(ids))
        except (TypeError, ValueError):
            raise ValueError("response_ids must be a 1-D sequence of token ids (ints)") from None
    if arr.ndim != 1:
        raise ValueError(f"response_ids must be 1-D, got shape {arr.shape}")
    return arr


def response_bytes(
    response_ids: Sequence[int], tokenizer, stop_ids: Collection[int] | None = None
) -> tuple[bytes, np.ndarray]:
    """(bytes of the tokens before the first stop id, ends [L] int64: end byte of each token, exclusive).

    Ids outside the vocabulary (e.g. the padded embedding rows 151669..151935 of Qwen models) and
    negative ids count as empty. The bytes are gathered with numpy from one flat buffer (no Python
    loop over tokens).
    """
    data, ends = _row_bytes(response_ids, tokenizer, stop_ids)
    return data, ends.astype(np.int64)


def _row_bytes(
    response_ids: Sequence[int], tokenizer, stop_ids: Collection[int] | None
) -> tuple[bytes, np.ndarray]:
    """One response's bytes and int32 token end bytes, cut at its first stop id."""
    return _gather(_byte_table(tokenizer), _cut(_as_array(response_ids), _stop_array(stop_ids)))


def _stop_array(stop_ids: Collection[int] | None) -> np.ndarray | None:
    return np.fromiter(stop_ids, dtype=np.int64) if stop_ids else None


def _cut(arr: np.ndarray, stops: np.ndarray | None) -> np.ndarray:
    """The ids before the first stop id."""
    if stops is not None and arr.size:
        hit = np.isin(arr, stops)
        if hit.any():
            return arr[: int(hit.argmax())]
    return arr


def _gather(table: _ByteTable, arr: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(the bytes of tokens ``arr``, int32 end byte of each token); ids outside the table count as empty."""
    empty = len(table.pieces) - 1
    # one unsigned comparison catches both negative ids (huge as uint64) and ids past the vocabulary
    if arr.size and arr.view(np.uint64).max() >= empty:
        arr = np.where((arr >= 0) & (arr < empty), arr, empty)
    pairs = table.spans64.take(arr).view(np.int32).reshape(-1, 2)
    firsts, lasts = pairs[:, 0], pairs[:, 1]
    lengths = lasts - firsts
    lengths += 1
    # np.add.accumulate rather than np.cumsum: keeps int32 (far more than any batch chunk needs) and
    # skips cumsum's wrapper layers, a measurable share at ~2,000 tokens
    ends = _running_sum(lengths)
    total = int(ends[-1]) if arr.size else 0
    if total == 0:
        return b"", ends
    if not lengths.all():  # empty tokens add no bytes: leave them out of the gather
        keep = lengths > 0
        firsts, lasts, token_ends = firsts[keep], lasts[keep], ends[keep]
    else:
        token_ends = ends
    # byte k of the response is flat[index[k]]: index rises by 1 inside a token and jumps at each
    # token's first byte, so it is the running sum of a step array that is 1 except at those jumps
    # (a scatter and two running sums: about half the cost of np.repeat of per-token offsets)
    step = np.ones(total, dtype=np.int32)
    step[0] = firsts[0]
    step[token_ends[:-1]] = firsts[1:] - lasts[:-1]
    index = _running_sum(step, out=step)
    return table.flat.take(index).tobytes(), ends


# Rows gathered together by the batch functions: one set of numpy calls per chunk instead of per row
# (their fixed cost is a third of a 2,000-token row's gather), while the chunk's arrays (~16 × 2,000
# tokens) still fit in the CPU's L2 cache, which a whole batch's would not.
CHUNK_ROWS = 16


def _batch_rows(
    batch_ids: Sequence[Sequence[int]] | Any, stop_ids: Collection[int] | None
) -> list[np.ndarray]:
    """Each row of a batch as a 1-D int64 array cut at its first stop id ([B, L] tensor/array or a list)."""
    stops = _stop_array(stop_ids)
    if hasattr(batch_ids, "detach"):  # torch [B, L] → numpy once
        batch_ids = batch_ids.detach().cpu().numpy()
    if isinstance(batch_ids, np.ndarray):
        if batch_ids.ndim != 2:
            raise ValueError(f"batch_ids must be 2-D [batch, length], got shape {batch_ids.shape}")
        ids = batch_ids.astype(np.int64, copy=False)
        lengths = np.full(len(ids), ids.shape[1])
        if stops is not None and ids.size:  # first stop of every row at once
            hit = np.isin(ids, stops)
            lengths = np.where(hit.any(axis=1), hit.argmax(axis=1), ids.shape[1])
        return [row[:n] for row, n in zip(ids, lengths.tolist(), strict=True)]
    return [_cut(_as_array(row), stops) for row in batch_ids]


def _batch_bytes(
    batch_ids: Sequence[Sequence[int]] | Any, tokenizer, stop_ids: Collection[int] | None
) -> Iterator[tuple[bytes, np.ndarray, int]]:
    """Per row: (its bytes, the int32 end bytes of its tokens, offset to subtract from those ends).

    Rows are gathered :data:`CHUNK_ROWS` at a time; a row's ends are a view into its chunk's, so they
    count from the chunk's first byte, hence the offset.
    """
    table = _byte_table(tokenizer)
    rows = _batch_rows(batch_ids, stop_ids)
    for k in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[k : k + CHUNK_ROWS]
        data, ends = _gather(table, np.concatenate(chunk) if len(chunk) > 1 else chunk[0])
        token_bounds = list(itertools.accumulate((row.size for row in chunk), initial=0))
        byte_bounds = np.concatenate(([0], ends)).take(token_bounds).tolist()  # row j: [j], [j + 1]
        for j in range(len(chunk)):
            start, stop = byte_bounds[j], byte_bounds[j + 1]
            yield data[start:stop], ends[token_bounds[j] : token_bounds[j + 1]], start


def _bisect_span(ends: np.ndarray, first: int, last: int, offset: int = 0) -> tuple[int, int] | None:
    """Token range covering bytes [first, last) given each token's end byte (+ offset); None when empty."""
    if first >= last:
        return None
    # first token whose bytes reach past `first`; one past the token holding byte last-1
    return (
        int(ends.searchsorted(first + offset, "right")),
        int(ends.searchsorted(last - 1 + offset, "right")) + 1,
    )


def _span_in_bytes(data: bytes, ends: np.ndarray, offset: int = 0) -> tuple[int, int] | None:
    """Token range of z_vis given the response bytes and each token's end byte (+ offset)."""
    opening = VISION_OPEN_B.search(data)
    if opening is None:
        return None
    closing = VISION_CLOSE_B.search(data, opening.end())
    if closing is None:
        return None
    return _bisect_span(ends, opening.end(), closing.start(), offset)  # z_vis bytes: [first, last)


def vision_token_span(
    response_ids: Sequence[int],
    tokenizer,
    stop_ids: Collection[int] | None = None,
) -> tuple[int, int] | None:
    """Half-open range [start, end) of the response tokens whose bytes overlap z_vis.

    z_vis is the text strictly between the first ``<vision>`` and the first ``</vision>`` after it
    (whitespace around ``<``, ``/``, ``>`` tolerated). Returns None when there is no closed vision block
    (a cut-off response) or z_vis is empty. ``stop_ids`` (pad/eos ids): tokens from the first of them
    on are ignored. Ids outside the tokenizer's vocabulary count as empty.

    >>> from vlcal_verl.testing.tokenizer import qwen_tokenizer
    >>> tok = qwen_tokenizer()
    >>> ids = tok.encode("<think><vision>two red dogs</vision>")
    >>> s, e = vision_token_span(ids, tok)
    >>> tok.decode(ids[s:e])
    'two red dogs'
    """
    return _span_in_bytes(*_row_bytes(response_ids, tokenizer, stop_ids))


def vision_token_spans(
    batch_ids: Sequence[Sequence[int]] | Any,
    tokenizer,
    stop_ids: Collection[int] | None = None,
) -> list[tuple[int, int] | None]:
    """:func:`vision_token_span` for each row of a batch (list of id lists or a [B, L] tensor).

    Rows are gathered :data:`CHUNK_ROWS` at a time, which is cheaper per row than one call per row.
    """
    return [_span_in_bytes(*row) for row in _batch_bytes(batch_ids, tokenizer, stop_ids)]


def _parse_row(
    data: bytes, ends: np.ndarray, offset: int, protocol: str
) -> tuple[ParsedResponse, tuple[int, int] | None]:
    # the text is the UTF-8 decoding of the tokens' bytes (invalid bytes → U+FFFD), which is what a
    # byte-level tokenizer's ``decode`` returns without skipping special tokens, at a fraction of the cost
    parsed = parse_response(data.decode("utf-8", errors="replace"), protocol)
    return parsed, _span_in_bytes(data, ends, offset)


def parse_response_ids(
    response_ids: Sequence[int],
    tokenizer,
    protocol: str = "decoupled",
    stop_ids: Collection[int] | None = None,
) -> tuple[ParsedResponse, tuple[int, int] | None]:
    """Parse a tokenised response and find its vision span from one gather of its bytes.

    Same as ``(parse_response(text, protocol), vision_token_span(response_ids, tokenizer, stop_ids))``
    where ``text`` is the decoded response (special tokens kept, invalid UTF-8 → U+FFFD).
    """
    return _parse_row(*_row_bytes(response_ids, tokenizer, stop_ids), 0, protocol)


def parse_responses_ids(
    batch_ids: Sequence[Sequence[int]] | Any,
    tokenizer,
    protocol: str = "decoupled",
    stop_ids: Collection[int] | None = None,
) -> list[tuple[ParsedResponse, tuple[int, int] | None]]:
    """:func:`parse_response_ids` for each row of a batch (list of id lists or a [B, L] tensor, e.g.
    verl's ``responses`` with ``stop_ids`` = {pad, eos}), gathering :data:`CHUNK_ROWS` rows at a time.

    >>> from vlcal_verl.testing.tokenizer import qwen_tokenizer
    >>> tok = qwen_tokenizer()
    >>> rows = [tok.encode("<think><vision>a dog</vision>"), tok.encode("no tags")]
    >>> [(p.failure, span) for p, span in parse_responses_ids(rows, tok)]
    [('missing <reasoning> inside <think>', (3, 5)), ('missing <think>', None)]
    """
    return [_parse_row(*row, protocol) for row in _batch_bytes(batch_ids, tokenizer, stop_ids)]


def span_mask(spans: Sequence[tuple[int, int] | None], length: int):
    """Bool mask [batch, length], True on tokens start ≤ t < end of each row's span (all False for None).

    >>> span_mask([(1, 3), None], 4).tolist()
    [[False, True, True, False], [False, False, False, False]]
    """
    import torch

    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    mask = torch.zeros(len(spans), length, dtype=torch.bool)
    for row, span in enumerate(spans):
        if span is not None:
            start, end = span
            if not 0 <= start <= end:
                raise ValueError(f"spans[{row}] = {span} is not a valid half-open range")
            mask[row, start : min(end, length)] = True
    return mask
