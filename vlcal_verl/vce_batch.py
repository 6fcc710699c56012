"""Collate (prompt with images, response ids) pairs into the verl-style batch that VCE consumes.

verl lays a rollout batch out as ``input_ids = [prompt (left-padded to P) | response (right-padded to
R)]`` with ``responses`` [B, R] and the processor's ``pixel_values`` / ``image_grid_thw``. The local
engine, the tests and the cost benchmark build the same layout here so :func:`vlcal_verl.vce.
compute_vce_signals` sees one format everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def build_vce_batch(
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]],
    responses: Sequence[Sequence[int]],
    uids: Sequence[str],
) -> dict[str, Any]:
    """Batch dict for :func:`vlcal_verl.vce.compute_vce_signals`.

    Args:
        prompts: B chat-formatted prompt texts, each with one ``<|image_pad|>`` per image.
        images: B lists of PIL images (the same count as the prompt's image pads).
        responses: B lists of response token ids (variable lengths; right-padded with the pad id).
        uids: B sample ids (seed the VCE masks).
    Returns:
        input_ids/attention_mask [B, P+R], responses/response_mask [B, R], pixel_values, image_grid_thw,
        mm_token_type_ids [B, P+R] (when the processor returns it), uid (list).
    """
    n = len(prompts)
    if not (len(images) == len(responses) == len(uids) == n):
        raise ValueError(
            f"prompts/images/responses/uids lengths differ: {n}, {len(images)}, {len(responses)}, {len(uids)}"
        )
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        flat = [img for imgs in images for img in imgs]
        enc = processor(text=list(prompts), images=flat or None, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    r = max((len(x) for x in responses), default=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    resp = torch.full((n, r), pad, dtype=torch.long)
    resp_mask = torch.zeros(n, r, dtype=torch.long)
    for i, ids in enumerate(responses):
        resp[i, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        resp_mask[i, : len(ids)] = 1
    batch = {
        "input_ids": torch.cat([enc["input_ids"], resp], 1),
        "attention_mask": torch.cat([enc["attention_mask"], resp_mask], 1),
        "responses": resp,
        "response_mask": resp_mask,
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": enc["image_grid_thw"],
        "uid": list(uids),
    }
    if "mm_token_type_ids" in enc:
        batch["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(resp)], 1)
    return batch
