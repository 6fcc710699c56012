"""Adapter for OpenRLHF's remote reward model contract (``--remote_rm_url http://host:port/get_reward``).

OpenRLHF posts ``{"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label, ...]}``
(newer versions add ``metas``) and reads ``rewards`` (used for advantages), ``scores`` (0..1, used for
dynamic filtering) and ``extra_logs`` (per-sample lists, logged). Labels are the ground truths.

Finding the response inside the query. The query is the *decoded* sequence, which need not start
with the prompt string OpenRLHF also sends: a VLM's decoded query has its image placeholder expanded
into hundreds of ``<|image_pad|>`` tokens, and a tokenizer round trip may change spacing. Scoring the
whole query would parse the prompt's own format example (``<think>``, ``\\boxed{}``) as if the model
had written it, so the response is located, in this order (the first that applies wins):

1. ``prefix``: the query starts with the prompt → the rest of the query.
2. ``prompt_suffix``: the longest tail of the prompt that occurs in the query (at least
   :data:`MIN_ANCHOR_CHARS` characters, or the whole prompt) → the text after its first occurrence.
   The prompt's text after its last image placeholder (the question and the chat template's
   generation prompt) survives decoding unchanged, so this is template-agnostic; the first
   occurrence, because the prompt part comes first and a response rarely repeats a long tail of it.
3. ``assistant_marker``: the text after the last assistant-turn marker of a known chat template
   (:data:`ASSISTANT_MARKERS`: ChatML as used by Qwen and InternVL, Llama 3).
4. ``no_prompt``: no prompt was sent → the query is taken as the response (as before).
5. ``not_found``: none of the above → the item is scored as an empty response (the unparsed
   penalty, R = −w_brier with the default weights), flagged in ``split`` and
   ``extra_logs["response_not_found"]``, and counted in
   ``vlcal_rs_get_reward_splits_total{method="not_found"}``.
"""

from __future__ import annotations

from reward_server import schemas

MIN_ANCHOR_CHARS = 16
"""Shortest prompt tail accepted as an anchor: shorter tails ("\\n", "t\\n") match by chance."""

ASSISTANT_MARKERS = (
    "<|im_start|>assistant\n",  # ChatML: Qwen2/2.5/3(-VL), InternVL
    "<|im_start|>assistant",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",  # Llama 3
    "<|start_header_id|>assistant<|end_header_id|>",
)

SPLIT_METHODS = ("prefix", "prompt_suffix", "assistant_marker", "no_prompt", "not_found")


def _longest_prompt_tail(query: str, prompt: str) -> int:
    """Length of the longest suffix of ``prompt`` that occurs in ``query`` (binary search: if a tail
    occurs, every shorter tail of it occurs too)."""
    lo, hi = 0, min(len(prompt), len(query))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt[-mid:] in query:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_response(query: str, prompt: str | None) -> tuple[str | None, str]:
    """``(response, method)`` for one OpenRLHF query; response is None when it cannot be located.

    >>> split_response("Q: 1+1? A: \\\\boxed{2}", "Q: 1+1? ")
    ('A: \\\\boxed{2}', 'prefix')
    >>> split_response("<img><pad><pad></img>How many apples? Answer: 3", "<img><pad></img>How many apples? Answer: ")
    ('3', 'prompt_suffix')
    >>> split_response("something else entirely", "How many apples are on the table?")
    (None, 'not_found')
    """
    if not prompt:
        return query, "no_prompt"
    if query.startswith(prompt):
        return query[len(prompt) :], "prefix"
    tail = _longest_prompt_tail(query, prompt)
    if tail >= min(MIN_ANCHOR_CHARS, len(prompt)) and tail > 0:
        anchor = prompt[-tail:]
        return query[query.index(anchor) + tail :], "prompt_suffix"
    for marker in ASSISTANT_MARKERS:
        at = query.rfind(marker)
        if at >= 0:
            return query[at + len(marker) :], "assistant_marker"
    return None, "not_found"


def response_text(query: str, prompt: str | None) -> str:
    """The response part of an OpenRLHF query; "" when it cannot be located (see :func:`split_response`).

    >>> response_text("Q: 1+1? A: \\\\boxed{2}", "Q: 1+1? ")
    'A: \\\\boxed{2}'
    """
    response, _ = split_response(query, prompt)
    return "" if response is None else response


def to_items(request: schemas.OpenRLHFRequest) -> tuple[list[schemas.ScoreItem], list[str]]:
    """Score items (uid = index) and, per item, how its response was found (one of SPLIT_METHODS)."""
    prompts = request.prompts or [None] * len(request.query)
    items, methods = [], []
    for i, (q, p, label) in enumerate(zip(request.query, prompts, request.labels, strict=True)):
        response, method = split_response(q, p)
        items.append(
            schemas.ScoreItem(uid=str(i), data_source="", response=response or "", ground_truth=label)
        )
        methods.append(method)
    return items, methods


def to_response(results: list[schemas.ScoreResult], methods: list[str]) -> schemas.OpenRLHFResponse:
    """rewards = R, scores = answer correctness I; extra_logs = the numeric components, per sample.

    An item whose reward could not be computed (status 'error', rare) gets reward 0 and is flagged in
    ``extra_logs["reward_error"]``: OpenRLHF needs a number for every sample. An item whose response
    could not be found in its query carries the empty response's penalty and is flagged in
    ``extra_logs["response_not_found"]`` and ``split``.
    """
    rewards = [r.score if r.score is not None else 0.0 for r in results]
    scores = [float(r.components.get("accuracy") or 0.0) for r in results]
    keys = sorted({k for r in results for k in r.components})
    extra_logs: dict[str, list] = {}
    for key in keys:  # numbers only: OpenRLHF turns each list into a tensor
        values = [r.components.get(key) for r in results]
        if all(isinstance(v, int | float) for v in values):
            extra_logs[key] = [float(v) for v in values]
    extra_logs["reward_error"] = [1.0 if r.status == "error" else 0.0 for r in results]
    extra_logs["grading_timeout"] = [1.0 if r.status == "timeout" else 0.0 for r in results]
    extra_logs["response_not_found"] = [1.0 if m == "not_found" else 0.0 for m in methods]
    return schemas.OpenRLHFResponse(rewards=rewards, scores=scores, extra_logs=extra_logs, split=methods)
