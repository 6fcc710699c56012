"""Requests for the HF rollout server: verl's sampling parameters, stop/ban token ids, prompt images.

Pure functions (no Ray, no model) that turn what verl's agent loop sends — ``sampling_params``,
``prompt_ids`` with the image pads already expanded, ``image_data`` — into what ``transformers``'
``generate`` needs, with vLLM's defaults and checks. Used by :mod:`.hf_engine`.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from dataclasses import dataclass
from typing import Any

import torch
from verl.workers.config import HFModelConfig, RolloutConfig

logger = logging.getLogger(__name__)

_SAMPLING_KEYS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "logprobs",
        "max_tokens",
        "max_new_tokens",
        "min_tokens",
        "ignore_eos",
        "seed",
        "stop_token_ids",
        "n",
    }
)


# ----------------------------------------------------------------------------------------------------
# pure helpers (no Ray, no model)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSpec:
    """One request's sampling settings, resolved from verl/vLLM-style ``sampling_params``."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        """vLLM's rule: a temperature below 1e-5 means greedy decoding."""
        return self.temperature < 1e-5


def request_seed(base_seed: int, request_id: str, prompt_ids: list[int]) -> int:
    """A sampling seed of one request under ``rollout.full_determinism``: a digest of the rollout seed, the
    request's key (verl's request id and its arrival count, ``HFRolloutServer._seed_key``) and the prompt's
    tokens (so one step's batch differs from the next). It does not depend on the replica, on requests of
    other prompts, or on how many steps ran before (a resumed run samples what the uninterrupted one did)."""
    digest = hashlib.sha256(f"{base_seed}|{request_id}|".encode() + array("q", prompt_ids).tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


def resolve_sampling(
    sampling_params: dict[str, Any],
    config: RolloutConfig,
    prompt_len: int,
    request_id: str = "",
    prompt_ids: list[int] | None = None,
) -> SamplingSpec:
    """Mirror ``vLLMHttpServer.generate``'s ``max_tokens`` rules and defaults; reject unknown keys.

    ``max_tokens`` (or SGLang's ``max_new_tokens``) wins; else ``min(response_length, prompt_length +
    response_length - prompt_len)``; then it is clamped to ``[1, max_model_len - prompt_len]``. Under
    ``full_determinism`` a request without a seed gets :func:`request_seed` (vLLM's server gives every
    request ``seed + replica_rank``, so the copies of one prompt on one replica would sample alike).
    """
    params = dict(sampling_params)
    unknown = set(params) - _SAMPLING_KEYS
    if unknown:
        raise ValueError(f"hf rollout: unsupported sampling params {sorted(unknown)}")
    if int(params.pop("n", 1)) != 1:
        raise ValueError("hf rollout: n > 1 is not supported (verl repeats prompts instead)")
    max_model_len = config.max_model_len
    room = max_model_len - prompt_len
    if room < 1:
        raise ValueError(f"Prompt length ({prompt_len}) leaves no room to generate within {max_model_len}")
    if "max_tokens" in params:
        max_tokens = params.pop("max_tokens")
    elif "max_new_tokens" in params:
        max_tokens = params.pop("max_new_tokens")
    else:
        max_tokens = min(config.response_length, config.prompt_length + config.response_length - prompt_len)
    params.pop("max_new_tokens", None)
    if config.full_determinism and params.get("seed") is None:
        params["seed"] = request_seed(config.seed, request_id, prompt_ids or [])
    params.setdefault("repetition_penalty", config.repetition_penalty)
    params.setdefault("ignore_eos", config.ignore_eos)
    top_k = params.pop("top_k", -1)
    return SamplingSpec(
        max_tokens=max(1, min(int(max_tokens), room)),
        temperature=float(params.pop("temperature", 1.0)),
        top_p=float(params.pop("top_p", 1.0)),
        top_k=-1 if top_k is None else int(top_k),
        min_p=float(params.pop("min_p", 0.0) or 0.0),
        repetition_penalty=float(params.pop("repetition_penalty")),
        min_tokens=int(params.pop("min_tokens", 0) or 0),
        logprobs=bool(params.pop("logprobs", False)),
        ignore_eos=bool(params.pop("ignore_eos")),
        seed=None if params.get("seed") is None else int(params.pop("seed")),
        stop_token_ids=tuple(int(t) for t in (params.pop("stop_token_ids", None) or ())),
    )


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(model_config: HFModelConfig) -> list[int]:
    """vLLM stops on the tokenizer's EOS plus the generation config's EOS ids; so do we."""
    ids = _as_id_list(getattr(model_config.tokenizer, "eos_token_id", None))
    ids += _as_id_list(getattr(model_config.generation_config, "eos_token_id", None))
    return sorted(set(ids))


def banned_token_ids(processor: Any, hf_config: Any) -> list[int]:
    """Vision tokens a policy must never sample: image/video pads and vision start/end/pad markers.

    verl's vLLM server bans the placeholders (``get_vision_placeholder_token_ids``); the markers are
    banned too because a stray ``<|vision_start|>`` before a text token confuses Qwen's rope index.
    Empty for text-only models.
    """
    from verl.utils.tokenizer import get_processor_token_id

    if processor is None:
        return []
    ids: set[int] = set()
    for modality in ("image", "video"):
        token_id = get_processor_token_id(processor, modality)
        if token_id is not None:
            ids.add(token_id)
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(cfg, name, None)
            if isinstance(value, int):
                ids.add(value)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        # Qwen-VL's vision pad; InternVL's <img> / </img> around each image's context tokens
        markers = (
            "<|vision_pad|>",
            getattr(processor, "start_image_token", None),
            getattr(processor, "end_image_token", None),
        )
        for token in filter(None, markers):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
                ids.add(token_id)
    return sorted(ids)


def _runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each maximal run of ``token_id`` in ``ids``."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(ids):
        if ids[i] == token_id:
            j = i
            while j < len(ids) and ids[j] == token_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def align_placeholders(prompt_ids: list[int], token_id: int, expected_runs: list[int]) -> list[int]:
    """Return ``prompt_ids`` whose ``token_id`` runs match ``expected_runs`` (the processor's lengths).

    Already expanded (verl's agent loop): unchanged. One pad per item (vLLM-style, e.g. after
    ``qwen2_5_vl_dedup_image_tokens``): each pad is expanded. Anything else raises ``ValueError``.
    """
    runs = _runs(prompt_ids, token_id)
    lengths = [length for _, length in runs]
    if sum(lengths) == sum(expected_runs):
        return list(prompt_ids)
    if len(runs) == len(expected_runs) and all(length == 1 for length in lengths):
        out: list[int] = []
        prev = 0
        for (start, _), n in zip(runs, expected_runs, strict=True):
            out += prompt_ids[prev:start] + [token_id] * n
            prev = start + 1
        return out + prompt_ids[prev:]
    raise ValueError(
        f"prompt has {sum(lengths)} placeholder tokens {token_id} in {len(runs)} runs, but the media "
        f"need runs of {expected_runs}"
    )


def build_mm_inputs(
    processor: Any,
    prompt_ids: list[int],
    image_data: list[Any] | None,
    video_data: list[Any] | None,
    mm_processor_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Processor features for the media of one prompt, and ``prompt_ids`` aligned to them.

    The processor is run on a text made only of one placeholder per image/video, through verl's own
    ``build_multimodal_processor_inputs`` (the call the agent loop used to build ``prompt_ids``), so
    ``pixel_values`` (``[sum(t*h*w), C*T*P*P]``), ``image_grid_thw`` (``[n_images, 3]``) and their video
    counterparts are the ones the prompt was built with. ``mm_token_type_ids`` (``[1, L]``: 1 image,
    2 video) is rebuilt from the final ids, as ``AgentLoopWorker._compute_position_ids`` does.
    """
    from verl.utils.tokenizer import build_multimodal_processor_inputs, get_processor_token_id

    images = list(image_data) if image_data else None
    videos = list(video_data) if video_data else None
    if processor is None or (images is None and videos is None):
        return list(prompt_ids), {}
    image_id = get_processor_token_id(processor, "image")
    video_id = get_processor_token_id(processor, "video")
    text = processor.image_token * len(images or []) + processor.video_token * len(videos or [])
    out = build_multimodal_processor_inputs(
        processor, text=[text], images=images, videos=videos, mm_processor_kwargs=mm_processor_kwargs
    )
    out = dict(out.convert_to_tensors("pt")) if hasattr(out, "convert_to_tensors") else dict(out)
    ref_ids = [int(t) for t in out.pop("input_ids")[0].tolist()]
    ids = list(prompt_ids)
    for token_id, items in ((image_id, images), (video_id, videos)):
        if items and token_id is not None:
            ids = align_placeholders(ids, token_id, [n for _, n in _runs(ref_ids, token_id)])
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        out.pop(key, None)
    type_ids = torch.zeros(1, len(ids), dtype=torch.long)
    ids_t = torch.tensor(ids)
    if image_id is not None:
        type_ids[0][ids_t == image_id] = 1
    if video_id is not None:
        type_ids[0][ids_t == video_id] = 2
    out["mm_token_type_ids"] = type_ids
    return ids, out
