"""Adapter for OpenRLHF's remote reward model contract (``--remote_rm_url http://host:port/get_reward``).

OpenRLHF posts ``{"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label, ...]}``
(newer versions add ``metas``) and reads ``rewards`` (used for advantages), ``scores`` (0..1, used for
dynamic filtering) and ``extra_logs`` (per-sample lists, logged). The response is the query with its
prompt prefix removed; labels are the ground truths.
"""

from __future__ import annotations

from reward_server import schemas


def response_text(query: str, prompt: str | None) -> str:
    """The response part of an OpenRLHF query (query = prompt + response).

    >>> response_text("Q: 1+1? A: \\\\boxed{2}", "Q: 1+1? ")
    'A: \\\\boxed{2}'
    """
    if prompt and query.startswith(prompt):
        return query[len(prompt) :]
    return query


def to_items(request: schemas.OpenRLHFRequest) -> list[schemas.ScoreItem]:
    prompts = request.prompts or [None] * len(request.query)
    return [
        schemas.ScoreItem(uid=str(i), data_source="", response=response_text(q, p), ground_truth=label)
        for i, (q, p, label) in enumerate(zip(request.query, prompts, request.labels, strict=True))
    ]


def to_response(results: list[schemas.ScoreResult]) -> schemas.OpenRLHFResponse:
    """rewards = R, scores = answer correctness I; extra_logs = the numeric components, per sample.

    An item whose reward could not be computed (status 'error', rare) gets reward 0 and is flagged in
    ``extra_logs["reward_error"]``: OpenRLHF needs a number for every sample.
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
    return schemas.OpenRLHFResponse(rewards=rewards, scores=scores, extra_logs=extra_logs)
