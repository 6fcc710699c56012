"""verl rollout ``"hf"``: a Hugging Face ``generate`` server for verl's V1 agent loop, for CPU-only runs.

verl 0.9.1 generates rollouts only through token-in/token-out *servers* (vLLM, SGLang, TRT-LLM): the
agent loop calls ``server_handle.generate.remote(prompt_ids, sampling_params, request_id, image_data=...)``
and expects a :class:`~verl.workers.rollout.replica.TokenOutput`. None of those engines runs on a
2-core CPU box, so this module provides the same three pieces with ``transformers`` instead:

- :class:`HFRolloutServer` — the server (a Ray actor, like ``vLLMHttpServer``): holds its own copy of
  the HF model and serves ``generate`` with verl's vLLM signature, the same ``max_tokens`` defaults,
  ``stop_reason`` values, ``extra_fields["global_steps"]``, abort/resume gate and no-op sleep/wake-up.
- :class:`HFReplica` — the ``RolloutReplica`` that launches one server per replica (registered with
  ``RolloutReplicaRegistry`` as ``"hf"``; looked up by ``LLMServerManager`` in the trainer process).
- :class:`HFServerAdapter` — the ``BaseRollout`` the hybrid ``ActorRolloutRefWorker`` builds with
  ``get_rollout_class("hf", "async")`` (looked up in each *worker* process). It pushes the actor's
  weights to its replica's server after every update.

Design (hybrid mode, the V1 sync trainer's mode). vLLM's hybrid server shares the GPU with the FSDP
worker and receives weights over ZMQ/CUDA IPC; on CPU there is no memory to share, so the server is a
separate Ray actor on the worker's node with its own model copy (tiny models: megabytes), and weights
travel as Ray calls: the trainer's ``checkpoint_manager.update_weights`` → ``worker.update_weights(
mode="naive")`` → ``HFServerAdapter.update_weights(engine.get_per_tensor_param())`` → buckets of
``checkpoint_engine.update_weights_bucket_megabytes`` → ``server.load_weights.remote``. Every rank
iterates the generator (FSDP's ``full_tensor()`` is a collective); only a replica's first rank sends.
With ``tensor_model_parallel_size=1`` each FSDP rank gets its own replica (two servers on two ranks,
generating in parallel); a larger size makes one server span that many ranks. TP is not real: the
server always runs the whole model in one process.

Log-probs: the actor recomputes ``log_softmax(logits / temperature)`` over the full vocabulary (no
top-k/top-p, no token bans), so the server returns exactly that for each sampled token — the raw
logits as the model emits them (after the repetition penalty only when one is set), temperature 1 for
greedy (vLLM's convention). Vision placeholder/marker tokens are banned from sampling: the k-th run of
``<|image_pad|>`` must pair with the k-th image, and a sampled one crashes ``get_rope_index``.

Prompt images: verl's agent loop builds ``prompt_ids`` through the processor, so image/video pads are
already expanded; the server re-runs the processor on the media alone (``pixel_values``,
``image_grid_thw``), checks the pad counts agree (expanding single collapsed pads if a caller sent
vLLM-style ids) and derives ``mm_token_type_ids`` the way the agent loop does for transformers 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"
ROLLOUT_MODE = "async"  # RolloutConfig accepts only "async" (verl/workers/config/rollout.py:286)
ADAPTER_FQDN = f"{__name__}.HFServerAdapter"
# verl / torch wrappers that may prefix state-dict names coming out of the training engine
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
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


def resolve_sampling(
    sampling_params: dict[str, Any], config: RolloutConfig, prompt_len: int, replica_rank: int = 0
) -> SamplingSpec:
    """Mirror ``vLLMHttpServer.generate``'s ``max_tokens`` rules and defaults; reject unknown keys.

    ``max_tokens`` (or SGLang's ``max_new_tokens``) wins; else ``min(response_length, prompt_length +
    response_length - prompt_len)``; then it is clamped to ``[1, max_model_len - prompt_len]``.
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
    if config.full_determinism:
        params.setdefault("seed", replica_rank + config.seed)
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
        for token in ("<|vision_pad|>",):
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


# ----------------------------------------------------------------------------------------------------
# the generation engine: one HF model, one request at a time (no Ray)
# ----------------------------------------------------------------------------------------------------


class _RecordAndBan:
    """Logits processor: records ``log_softmax(scores / T)`` for the sampled tokens, then bans tokens.

    HF runs custom processors after its own (only the repetition penalty is ever active here) and
    before the temperature/top-k/top-p warpers, so ``scores`` are the model's logits. The token sampled
    from step ``t`` is only known at step ``t + 1`` (it is the last id then), so one row is kept.
    """

    def __init__(self, temperature: float, banned: list[int], record: bool) -> None:
        self.temperature = temperature
        self.banned = torch.tensor(banned, dtype=torch.long)
        self.record = record
        self.prev_row: torch.Tensor | None = None
        self.log_probs: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` ``[1, L]``, ``scores`` ``[1, V]``; returns ``scores`` with banned ids at -inf."""
        if self.record:
            self.take_last(int(input_ids[0, -1]))
            self.prev_row = torch.log_softmax(scores[0].float() / self.temperature, dim=-1)
        if self.banned.numel():
            scores = scores.clone()
            scores[:, self.banned.to(scores.device)] = float("-inf")
        return scores

    def take_last(self, token_id: int) -> None:
        if self.prev_row is not None:
            self.log_probs.append(float(self.prev_row[token_id]))
            self.prev_row = None


class _AbortCriteria:
    """Stopping criterion that ends generation as soon as ``event`` is set (``abort_all_requests``)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.fired = False

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        self.fired = self.event.is_set()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


def _model_class(hf_config: Any) -> Any:
    import transformers

    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is not None:
        return cls
    if getattr(hf_config, "vision_config", None) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_hf_model(
    model_config: HFModelConfig, dtype: torch.dtype, load_format: str, attn_implementation: str
) -> torch.nn.Module:
    """The rollout's own HF model: random (``load_format`` containing ``"dummy"``, weights arrive with the
    first ``update_weights``, like vLLM's dummy format) or from ``model_config.local_path``."""
    # verl's hf_config carries the overrides the actor was built with (eos/pad ids, override_config)
    hf_config = copy.deepcopy(model_config.hf_config)
    cls = _model_class(hf_config)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if "dummy" in load_format:
        factory = getattr(cls, "_from_config", None) or cls.from_config  # concrete vs Auto classes
        model = factory(hf_config, **kwargs)
    else:
        model = cls.from_pretrained(
            model_config.local_path,
            config=hf_config,
            trust_remote_code=model_config.trust_remote_code,
            **kwargs,
        )
    return model.to(dtype=dtype).eval()


class HFGenerationEngine:
    """One HF model serving token-in/token-out requests one at a time, plus in-place weight loading.

    Thread-safe: ``generate`` and ``load_weights`` take ``self.lock`` (the server runs them in worker
    threads so its event loop stays free for abort/resume calls).
    """

    def __init__(self, model: torch.nn.Module, model_config: HFModelConfig, seed: int = 0) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.model_config = model_config
        self.processor = model_config.processor
        tokenizer = model_config.tokenizer
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.eos_ids = eos_token_ids(model_config)
        if self.pad_token_id is None and self.eos_ids:
            self.pad_token_id = self.eos_ids[0]
        self.banned = banned_token_ids(self.processor, model_config.hf_config)
        # no checkpoint defaults (top_k=20, suppress_tokens, ...) may leak into a request
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_token_id)
        self.accepts_mm_token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        self.lock = threading.Lock()
        self.abort_event = threading.Event()
        self._names = self._weight_names()
        self._loaded: set[str] = set()
        torch.manual_seed(seed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self,
        prompt_ids: list[int],
        spec: SamplingSpec,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> tuple[list[int], list[float], bool]:
        """Generate one response; return ``(token_ids, log_probs, aborted)``.

        ``log_probs[i]`` is ``log_softmax(logits_i / T)[token_ids[i]]`` (``T = 1`` when greedy), always
        computed; ``token_ids`` include the EOS token when generation stopped on it (as vLLM's do).
        """
        ids, mm = build_mm_inputs(self.processor, prompt_ids, image_data, video_data, mm_processor_kwargs)
        with self.lock:
            if self.abort_event.is_set():
                return [], [], True
            temperature = 1.0 if spec.greedy else spec.temperature
            recorder = _RecordAndBan(temperature, self.banned, record=True)
            abort = _AbortCriteria(self.abort_event)
            kwargs = self._generate_kwargs(ids, mm, spec)
            rng = torch.random.fork_rng(devices=[]) if spec.seed is not None else contextlib.nullcontext()
            with rng, torch.inference_mode():
                if spec.seed is not None:
                    torch.manual_seed(spec.seed)
                out = self.model.generate(logits_processor=[recorder], stopping_criteria=[abort], **kwargs)
        token_ids = [int(t) for t in out[0, len(ids) :].tolist()]
        if token_ids:
            recorder.take_last(token_ids[-1])
        return token_ids, recorder.log_probs[: len(token_ids)], abort.fired

    def _generate_kwargs(
        self, ids: list[int], mm: dict[str, torch.Tensor], spec: SamplingSpec
    ) -> dict[str, Any]:
        """``model.generate`` kwargs: input ``[1, L]``, media features, a fresh ``GenerationConfig``."""
        from transformers import GenerationConfig

        eos = None if spec.ignore_eos else sorted(set(self.eos_ids) | set(spec.stop_token_ids)) or None
        # every knob explicit: transformers 5 fills unset (None) fields with global defaults (top_k=50)
        gen = GenerationConfig(
            max_new_tokens=spec.max_tokens,
            min_new_tokens=spec.min_tokens or None,
            do_sample=not spec.greedy,
            temperature=1.0 if spec.greedy else spec.temperature,
            top_k=0 if spec.greedy or spec.top_k <= 0 else spec.top_k,
            top_p=1.0 if spec.greedy else spec.top_p,
            min_p=None if spec.greedy or spec.min_p <= 0 else spec.min_p,
            repetition_penalty=spec.repetition_penalty,
            eos_token_id=eos,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        device, dtype = self.device, next(self.model.parameters()).dtype
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "generation_config": gen,
        }
        for key, value in mm.items():
            if key == "mm_token_type_ids" and not self.accepts_mm_token_types:
                continue
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            kwargs[key] = value
        return kwargs

    # --- weights --------------------------------------------------------------------------------

    def _weight_names(self) -> dict[str, str]:
        """Accepted incoming name → our state-dict name (ours, plus verl's checkpoint-format names)."""
        from verl.utils.model import convert_weight_keys

        ours = list(self.model.state_dict().keys())
        names = {name: name for name in ours}
        converted = convert_weight_keys(dict.fromkeys(ours), self.model)
        names.update({ext: internal for ext, internal in zip(converted, ours, strict=True)})
        return names

    def begin_weight_update(self) -> None:
        self._loaded = set()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy ``(name, tensor)`` pairs into the model in place (cast to its dtype); return the count."""
        state = self.model.state_dict(keep_vars=True)
        count = 0
        with self.lock, torch.no_grad():
            for raw_name, tensor in named_tensors:
                name = raw_name
                for prefix in _WRAPPER_PREFIXES:
                    name = name.replace(prefix, "")
                target_name = self._names.get(name)
                if target_name is None:
                    raise KeyError(
                        f"hf rollout: weight {raw_name!r} has no counterpart in {type(self.model).__name__}"
                    )
                target = state[target_name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"{raw_name}: shape {tuple(tensor.shape)} != rollout's {tuple(target.shape)}"
                    )
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                self._loaded.add(target_name)
                count += 1
        return count

    def missing_weights(self) -> list[str]:
        """Parameters not written since ``begin_weight_update`` (tied ones count as written)."""
        written = {id(t) for n, t in self.model.state_dict(keep_vars=True).items() if n in self._loaded}
        return [n for n, p in self.model.named_parameters(remove_duplicate=False) if id(p) not in written]


# ----------------------------------------------------------------------------------------------------
# the server (a Ray actor in a run; a plain object in unit tests)
# ----------------------------------------------------------------------------------------------------


class HFRolloutServer:
    """Token-in/token-out HF server with the methods verl calls on ``vLLMHttpServer``.

    Sleep/wake-up/KV-cache calls are no-ops: HF ``generate`` keeps no cache between requests and CPU
    memory holds both model copies. Abort is real: in-flight requests stop at the next token and
    return ``stop_reason="aborted"``; new ones wait behind a closed gate until ``resume_generation``
    (or are rejected when ``reject_request=True``), as in vLLM's server.
    """

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        rollout_mode: RolloutMode = RolloutMode.HYBRID,
        replica_rank: int = 0,
        node_rank: int = 0,
        server_name: str = "",
    ) -> None:
        from verl.utils.torch_dtypes import PrecisionType
        from verl.workers.rollout.utils import get_max_position_embeddings

        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        max_len = get_max_position_embeddings(self.model_config.hf_config)
        if self.config.max_model_len is None or self.config.max_model_len > max_len:
            self.config.max_model_len = max_len
        self.rollout_mode, self.replica_rank, self.node_rank = rollout_mode, replica_rank, node_rank
        self.server_name = server_name or f"{ROLLOUT_NAME}_server_{replica_rank}_{node_rank}"
        hf_kwargs = dict(self.config.engine_kwargs.get(ROLLOUT_NAME, None) or {})
        if hf_kwargs.get("num_threads"):
            torch.set_num_threads(int(hf_kwargs["num_threads"]))
        model = load_hf_model(
            self.model_config,
            PrecisionType.to_dtype(self.config.dtype),
            self.config.load_format,
            hf_kwargs.get("attn_implementation", "sdpa"),
        )
        self.engine = HFGenerationEngine(model, self.model_config, seed=self.config.seed + replica_rank)
        self.global_steps: int | None = None
        self._inflight = 0
        self._resume = asyncio.Event()
        self._resume.set()
        self._rejecting = False

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        priority: int = 0,
        kv_transfer_params: dict | None = None,
    ) -> TokenOutput:
        """Generate one response (``vLLMHttpServer.generate``'s signature); see :class:`TokenOutput`."""
        from verl.utils.tokenizer import normalize_token_ids

        if audio_data is not None or kv_transfer_params is not None:
            raise NotImplementedError("hf rollout: audio and PD KV transfer are not supported")
        prompt_ids = normalize_token_ids(prompt_ids)
        spec = resolve_sampling(sampling_params, self.config, len(prompt_ids), self.replica_rank)
        while not self._resume.is_set():
            if self._rejecting:
                return self._aborted()
            await self._resume.wait()
        self._inflight += 1
        try:
            token_ids, log_probs, aborted = await asyncio.to_thread(
                self.engine.generate, prompt_ids, spec, image_data, video_data, mm_processor_kwargs
            )
        finally:
            self._inflight -= 1
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if spec.logprobs else None,
            stop_reason="aborted" if aborted else "completed",
            num_preempted=0,
            extra_fields={"global_steps": self.global_steps, "num_cached_tokens": 0},
        )

    def _aborted(self) -> TokenOutput:
        return TokenOutput(
            token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps}
        )

    # --- weights (called by HFServerAdapter) ---------------------------------------------------

    async def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    async def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of full tensors; returns how many were written."""
        return await asyncio.to_thread(self.engine.load_weights, named_tensors)

    async def finish_weight_update(self, global_steps: int | None = None) -> list[str]:
        """Record the weights' version; return (and log) parameters the update did not cover."""
        missing = self.engine.missing_weights()
        if missing:
            logger.warning(
                "hf rollout %s: %d parameters not updated, e.g. %s",
                self.server_name,
                len(missing),
                missing[:3],
            )
        if global_steps is not None:
            self.global_steps = global_steps
        return missing

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # --- control plane (the names verl calls on its servers) -------------------------------------

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Stop in-flight requests at their next token and close the gate; wait for them to drain."""
        self._resume.clear()
        self._rejecting = reject_request
        aborted = self._inflight
        self.engine.abort_event.set()
        while self._inflight > 0:
            await asyncio.sleep(0.01)
        return {"aborted_count": aborted, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": False, "request_id": request_id, "error": "hf rollout aborts only all requests"}

    async def resume_generation(self) -> None:
        self.engine.abort_event.clear()
        self._rejecting = False
        self._resume.set()

    async def resume_engine_generation(self) -> None:
        self.engine.abort_event.clear()

    async def open_submission_gate(self) -> None:
        self._rejecting = False
        self._resume.set()

    async def wait_for_requests_to_drain(self) -> None:
        while self._inflight > 0:
            await asyncio.sleep(0.01)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    def get_server_address(self) -> tuple[str, None]:
        return f"{ROLLOUT_NAME}://{self.server_name}", None

    def get_rollout_config(self) -> RolloutConfig:
        return self.config


# ----------------------------------------------------------------------------------------------------
# replica (trainer process) and adapter (worker process)
# ----------------------------------------------------------------------------------------------------


def server_actor_name(
    replica_rank: int, prefix: str = f"{ROLLOUT_NAME}_", kind: str = "", suffix: str = ""
) -> str:
    """``hf_server_<replica>_0``: vLLM's naming (``ServerAdapter`` finds its server by this name)."""
    return f"{prefix}server_{kind}{replica_rank}_0{suffix}"


class HFReplica(RolloutReplica):
    """One :class:`HFRolloutServer` actor per replica, on the node of the replica's first worker.

    The actor asks for no CPU or GPU (the FSDP workers hold the node's logical GPUs and the CPUs are
    the machine's only compute; generation and training never overlap in the sync trainer).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(HFRolloutServer)

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        kind = "reward_" if self.is_reward_model else "teacher_" if self.is_teacher_model else ""
        name = server_actor_name(self.replica_rank, kind=kind, suffix=self.name_suffix)
        options: dict[str, Any] = {
            "name": name,
            "max_concurrency": self.max_concurrency,
            "num_cpus": 0,
            "num_gpus": 0,
        }
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_node_id()
            )
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        server = self.server_class.options(**options).remote(
            config=self.config,
            model_config=self.model_config,
            rollout_mode=self.rollout_mode,
            replica_rank=self.replica_rank,
            node_rank=0,
            server_name=name,
        )
        address, _ = await server.get_server_address.remote()  # also waits for the model to load
        self.servers = [server]
        self._server_handle = server
        self._server_address = address

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        results = await asyncio.gather(
            *[s.abort_all_requests.remote(reject_request=reject_request) for s in self.servers]
        )
        return {
            "aborted_count": sum(r["aborted_count"] for r in results),
            "request_ids": [],
            "server_results": results,
        }

    async def abort_request(self, request_id: str) -> dict[str, Any]:
        return await self.servers[0].abort_request.remote(request_id)


class HFServerAdapter(BaseRollout):
    """The hybrid worker's handle on its replica's :class:`HFRolloutServer` (``vLLM ServerAdapter``'s role).

    Built by ``ActorRolloutRefWorker.init_model`` in every worker; the replica's first rank
    (``rollout_rank == 0``) talks to the server, found lazily by actor name (servers start after the
    workers).
    """

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        device_mesh: Any = None,
        replica_rank: int = -1,
    ) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % size
        self.server_handle: Any = None

    @property
    def is_leader_rank(self) -> bool:
        return self.rollout_rank == 0

    def _server(self) -> Any:
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_actor_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]) -> None:
        if self.config.free_cache_engine and self.is_leader_rank:
            await self._server().wake_up.remote(tags=tags)

    async def release(self) -> None:
        if self.config.free_cache_engine and self.is_leader_rank:
            await self._server().sleep.remote()

    async def update_weights(
        self,
        weights: Any,
        global_steps: int | None = None,
        wire_format: str = "named_tensors",
        **kwargs: Any,
    ) -> None:
        """Stream ``(name, full tensor)`` pairs to the server in buckets; every rank drains ``weights``.

        ``weights`` may be a sync or async iterable; each bucket holds at most
        ``checkpoint_engine.update_weights_bucket_megabytes`` (one larger tensor goes alone).
        """
        from verl.workers.rollout.utils import ensure_async_iterator

        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout: wire_format {wire_format!r} (only 'named_tensors')")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError(
                "hf rollout: LoRA adapters are not supported; set model.lora.merge=True"
            )
        start = time.time()
        server = self._server() if self.is_leader_rank else None
        limit = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        if server is not None:
            await server.begin_weight_update.remote()
        async for name, tensor in ensure_async_iterator(weights):
            if server is None:
                continue  # still iterate: FSDP's full_tensor() is a collective every rank joins
            t = tensor.detach().to("cpu").contiguous()
            if bucket and size + t.nbytes > limit:
                await server.load_weights.remote(bucket)
                bucket, size = [], 0
            bucket.append((name, t))
            size += t.nbytes
        if server is not None:
            if bucket:
                await server.load_weights.remote(bucket)
            await server.finish_weight_update.remote(global_steps)
            logger.info(
                "hf rollout replica %d: weights updated in %.2fs", self.replica_rank, time.time() - start
            )

    def generate_sequences(self, prompts: Any) -> Any:
        raise NotImplementedError("hf rollout is server-only: generation goes through the agent loop")


# ----------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------


def _load_replica() -> type[RolloutReplica]:
    return HFReplica


def register_rollout() -> str:
    """Register rollout ``"hf"`` in verl's two rollout registries (idempotent); return the name.

    - ``RolloutReplicaRegistry`` (trainer / task-runner process: ``LLMServerManager`` resolves
      ``rollout.name`` there) gets a loader for :class:`HFReplica`.
    - ``_ROLLOUT_REGISTRY`` (worker processes: ``ActorRolloutRefWorker.init_model`` and
      ``CheckpointEngineWorker`` call ``get_rollout_class(name, mode)``) gets the adapter's import
      path. verl 0.9.1 has no register function for it (``verl/workers/rollout/base.py``: a module
      dict read by ``get_rollout_class``); adding a key is the least invasive hook — patching
      ``get_rollout_class`` would need every ``from ... import get_rollout_class`` site patched too.

    Call it in every process (driver, task runner, Ray workers); it is cheap after the first call.
    """
    from verl.workers.rollout import base, replica

    if replica.RolloutReplicaRegistry._registry.get(ROLLOUT_NAME) is not _load_replica:
        replica.RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, ROLLOUT_MODE)] = ADAPTER_FQDN
    return ROLLOUT_NAME
