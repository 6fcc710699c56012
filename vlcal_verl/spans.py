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

import bisect
import contextlib
import functools
import re
import weakref
from collections.abc import Collection, Sequence
from itertools import accumulate
from typing import Any

from vlcal_verl.protocol import WS

_WS_B = WS.encode()
VISION_OPEN_B = re.compile(b"<" + _WS_B + b"vision" + _WS_B + b">")
VISION_CLOSE_B = re.compile(b"<" + _WS_B + b"/" + _WS_B + b"vision" + _WS_B + b">")

_TABLES: weakref.WeakKeyDictionary[Any, tuple[list[bytes], list[int]]] = weakref.WeakKeyDictionary()


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


def token_bytes_table(tokenizer) -> tuple[list[bytes], list[int]]:
    """(id → bytes, id → byte length) for a byte-level BPE tokenizer; cached per tokenizer object.

    Added tokens (``<think>``, ``<|im_end|>`` …) map to the UTF-8 of their content. Raises ValueError
    for a tokenizer that is not byte-level (e.g. SentencePiece), whose tokens are not fixed bytes.
    """
    try:
        return _TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    decoder = _byte_decoder()
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    size = max(len(tokenizer), max(added, default=-1) + 1)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    table: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in added:
            table.append(added[i].encode("utf-8"))
        elif piece is None:
            table.append(b"")
        else:
            try:
                table.append(bytes(decoder[ch] for ch in piece))
            except KeyError:
                raise ValueError(
                    f"tokenizer is not byte-level BPE (token {i} = {piece!r}); vision_token_span "
                    "needs a tokenizer whose ids map to fixed bytes (Qwen2/2.5/3, GPT-2 family)"
                ) from None
    lengths = [len(b) for b in table]
    with contextlib.suppress(TypeError):  # not weak-referenceable: recompute next time
        _TABLES[tokenizer] = (table, lengths)
    return table, lengths


def _as_list(ids: Sequence[int] | Any) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensor / numpy array
        ids = ids.tolist()
    return list(ids)


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
    table, lengths = token_bytes_table(tokenizer)
    ids = _as_list(response_ids)
    if stop_ids:
        stop = set(stop_ids)
        for i, t in enumerate(ids):
            if t in stop:
                ids = ids[:i]
                break
    n = len(table)
    data = b"".join([table[t] if 0 <= t < n else b"" for t in ids])
    opening = VISION_OPEN_B.search(data)
    if opening is None:
        return None
    closing = VISION_CLOSE_B.search(data, opening.end())
    if closing is None:
        return None
    first, last = opening.end(), closing.start()  # z_vis bytes: [first, last)
    if first == last:
        return None
    ends = list(accumulate([lengths[t] if 0 <= t < n else 0 for t in ids]))  # ends[i]: end byte of token i
    start = bisect.bisect_right(ends, first)  # first token whose bytes reach past `first`
    end = bisect.bisect_right(ends, last - 1) + 1  # one past the token holding byte last-1
    return start, end


def vision_token_spans(
    batch_ids: Sequence[Sequence[int]] | Any,
    tokenizer,
    stop_ids: Collection[int] | None = None,
) -> list[tuple[int, int] | None]:
    """:func:`vision_token_span` for each row of a batch (list of id lists or a [B, L] tensor)."""
    rows = batch_ids.tolist() if hasattr(batch_ids, "tolist") else batch_ids
    return [vision_token_span(row, tokenizer, stop_ids) for row in rows]


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
