"""The HF rollout server's generation engine: one ``transformers`` model, one request at a time, no Ray.

Samples with verl's sampling parameters, returns each sampled token's log-probability as verl's actor
recomputes it (``log_softmax(logits / T)`` over the full vocabulary), never samples a vision placeholder,
stops on abort, and loads weights pushed from the FSDP actor. :mod:`.rollout` wraps it in a Ray actor.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import threading
from collections.abc import Iterable
from typing import Any

import torch
from verl.workers.config import HFModelConfig

from vlcal_verl.verl_ext.cpu_backend.hf_inputs import (
    SamplingSpec,
    banned_token_ids,
    build_mm_inputs,
    eos_token_ids,
)

logger = logging.getLogger(__name__)

# verl / torch wrappers that may prefix state-dict names coming out of the training engine
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
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
