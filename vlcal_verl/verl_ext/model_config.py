"""verl's model config with two additions: InternVL's HF processor, and no silent text-only VLM runs.

verl 0.9.1 builds the processor in ``HFModelConfig.__post_init__`` through ``verl.utils.hf_processor``,
which knows the Qwen-VL, GLM-4V, Mllama and Gemma-4 processors only. For any other class it *warns* and
sets ``processor = None``: verl's dataset then refuses every image row ("processor is needed"), and a
dataset class that passed them on would have its images dropped. verl's trainer, training workers and
agent-loop workers (and this package's HF rollout) build the model config with
``omega_conf_to_dataclass(config.actor_rollout_ref.model)``, i.e. Hydra's ``_target_`` (vLLM's server
forces verl's class, and processes images itself); this package's ``vlcal_trainer.yaml`` points
``_target_`` at :class:`VLCalModelConfig`, verl's class plus:

- **InternVL** (``InternVLProcessor``, transformers' HF format, e.g. the ``-HF`` releases of
  InternVL3.5): accepted as :class:`VerlInternVLProcessor`, with verl's plain 1-D positions (InternVL
  has no M-RoPE, so no ``get_rope_index`` is bound). Its tile settings are checked against the model's
  at start-up (:func:`check_internvl_layout`).
- **A guard**: a model whose config has a ``vision_config`` but for which no processor could be built
  stops with a message naming the processor class, instead of training text-only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from transformers import BatchFeature, InternVLProcessor
from transformers.image_utils import make_flat_list_of_images
from transformers.models.internvl.processing_internvl import InternVLProcessorKwargs
from verl.workers.config import HFModelConfig

VERL_PROCESSOR_WARNING = "Failed to create processor"


class VerlInternVLProcessor(InternVLProcessor):
    """transformers' ``InternVLProcessor`` as verl's agent loop needs it.

    The agent loop builds ``prompt_ids`` with the processor (each image becomes ``<img>`` + 256 ×
    tiles ``<IMG_CONTEXT>`` + ``</img>``), then re-runs it to get ``multi_modal_inputs`` on the prompt
    *decoded with special tokens skipped* — which removes InternVL's image placeholders (Qwen-VL's
    processor tolerates a text without placeholders; InternVL's raises "Number of image placeholders
    in the prompt does not match the number of images"). A call whose texts hold no image placeholder at
    all while images are given is that re-run: it returns the images' ``pixel_values`` (the same image
    processor and kwargs, so the same tiles) and the text's ids unexpanded. Every other call is
    transformers' own.
    """

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any):
        texts = [text] if isinstance(text, str) else list(text or [])
        if images is None or videos is not None or any(self.image_token in t for t in texts):
            return super().__call__(images=images, text=text, videos=videos, **kwargs)
        merged = self._merge_kwargs(
            InternVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        flat = self.image_processor.fetch_images(images)
        image_inputs = self.image_processor(images=make_flat_list_of_images(flat), **merged["images_kwargs"])
        image_inputs.pop("num_patches", None)
        return_tensors = merged["text_kwargs"].pop("return_tensors", None)
        merged["text_kwargs"].pop("return_mm_token_type_ids", None)
        text_inputs = self.tokenizer(texts, **merged["text_kwargs"])
        return BatchFeature(
            data={**text_inputs, "pixel_values": image_inputs["pixel_values"]}, tensor_type=return_tensors
        )

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """Saved as transformers' ``InternVLProcessor`` (verl writes the processor beside every HF
        checkpoint), so ``AutoProcessor`` — ``vlcal eval``, vLLM, any HF user — reloads it; under this
        class's name it would fall back to the bare tokenizer."""
        plain = InternVLProcessor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            video_processor=self.video_processor,
            image_seq_length=self.image_seq_length,
            chat_template=self.chat_template,
        )
        return plain.save_pretrained(save_directory, *args, **kwargs)


def tokens_per_tile(hf_config: Any) -> int:
    """Image tokens one InternVL tile becomes: (image_size / patch)² · downsample_ratio²."""
    vision = hf_config.vision_config
    size = _side(vision.image_size)
    patch = _side(vision.patch_size)
    return round((size // patch) ** 2 * float(hf_config.downsample_ratio) ** 2)


def _side(value: Any) -> int:
    """A square side from an int or an [h, w] pair (InternVL configs use both)."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"InternVL: non-square tiles are not supported, got {list(value)}")
        value = value[0]
    return int(value)


def check_internvl_layout(processor: Any, hf_config: Any) -> None:
    """Refuse a processor whose tiles disagree with the model: tile side, tokens per tile and the
    image-context token must be the model's, or verl's prompt ids and the vision tower's features (and
    vLLM's own expansion of each image placeholder) would not line up."""
    ip = processor.image_processor
    tile = _side(hf_config.vision_config.image_size)
    size = ip.size
    hw = (int(size["height"]), int(size["width"])) if "height" in size else (int(size), int(size))
    problems = []
    if hw != (tile, tile):
        problems.append(f"image processor tiles are {size}, the vision tower's are {tile}×{tile}")
    want = tokens_per_tile(hf_config)
    if int(processor.image_seq_length) != want or int(hf_config.image_seq_length) != want:
        problems.append(
            f"tokens per tile: processor {processor.image_seq_length}, config {hf_config.image_seq_length}, "
            f"vision tower {want}"
        )
    token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if token_id != int(hf_config.image_token_id):
        problems.append(
            f"{processor.image_token} is id {token_id}, the model's image_token_id is {hf_config.image_token_id}"
        )
    if problems:
        raise ValueError("InternVL processor and model disagree: " + "; ".join(problems))


def internvl_processor(path: str, hf_config: Any, **kwargs: Any) -> VerlInternVLProcessor:
    """:class:`VerlInternVLProcessor` from a checkpoint folder, checked against ``hf_config``."""
    processor = VerlInternVLProcessor.from_pretrained(path, **kwargs)
    processor.config = hf_config
    check_internvl_layout(processor, hf_config)
    return processor


def processor_class_name(path: str, **kwargs: Any) -> str | None:
    """The processor class a checkpoint folder declares (``processor_class`` of its processor config,
    else ``AutoProcessor``'s choice), or None."""
    import json
    from pathlib import Path

    for name in ("processor_config.json", "preprocessor_config.json"):
        f = Path(path) / name
        if f.is_file():
            declared = json.loads(f.read_text(encoding="utf-8")).get("processor_class")
            if declared:
                return str(declared)
    from transformers import AutoProcessor

    try:
        return type(AutoProcessor.from_pretrained(path, **kwargs)).__name__
    except Exception:  # a text-only model or a broken folder: the guard reports it
        return None


@dataclass
class VLCalModelConfig(HFModelConfig):
    """``HFModelConfig`` that accepts InternVL's processor and never loses a VLM's processor silently."""

    def __post_init__(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().__post_init__()
        kwargs = {"trust_remote_code": self.trust_remote_code}
        is_vlm = getattr(self.hf_config, "vision_config", None) is not None
        if self.load_tokenizer and self.processor is None and is_vlm:
            name = processor_class_name(self.local_tokenizer_path, **kwargs)
            if name == "InternVLProcessor":
                self.processor = internvl_processor(self.local_tokenizer_path, self.hf_config, **kwargs)
                caught = [w for w in caught if VERL_PROCESSOR_WARNING not in str(w.message)]
            else:
                why = [str(w.message) for w in caught if VERL_PROCESSOR_WARNING in str(w.message)]
                raise ValueError(
                    f"{self.path} is a vision-language model ({type(self.hf_config).__name__}) but verl built no "
                    f"processor for it (processor class: {name or 'none found'}"
                    + (f"; verl said: {why[0]}" if why else "")
                    + "): it would train text-only, every image dropped. Supported: Qwen2/2.5/3-VL, InternVL (HF format)."
                )
        for w in caught:  # verl's other warnings, unchanged
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _no_images(args: tuple, kwargs: dict) -> bool:
    return kwargs.get("pixel_values") is None and not (args and len(args) > 1 and args[1] is not None)


def _note_images_hook(module: Any, args: tuple, kwargs: dict) -> None:
    """Before an ``InternVLModel`` forward: note whether it has images (for :func:`_dummy_vision_pre_hook`)."""
    module._vlcal_dummy_features = None
    module._vlcal_needs_dummy = _no_images(args, kwargs)


def _dummy_vision_pre_hook(owner: Any) -> Any:
    """A forward pre-hook for ``owner.language_model``: in a forward of ``owner`` (an ``InternVLModel``)
    without images, run the vision tower and projector on one black tile at the point where a forward with
    images runs them — after the token embedding, before the language model's layers — so every FSDP rank
    gathers the same shards in the same order (verl wraps ``embed_tokens`` as its own unit when embeddings
    are untied). The features wait on ``owner`` for :func:`_dummy_vision_hook`.

    Run before the embedding, or after the language model, a rank without images gathered one unit while a
    rank with images gathered another: gloo's "Received data size doesn't match expected size"."""

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        if not getattr(owner, "_vlcal_needs_dummy", False):
            return
        owner._vlcal_needs_dummy = False
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        side = _side(owner.config.vision_config.image_size)
        param = next(owner.vision_tower.parameters())
        tile = torch.zeros(1, 3, side, side, device=param.device, dtype=param.dtype)
        owner._vlcal_dummy_features = owner.get_image_features(
            pixel_values=tile,
            vision_feature_layer=owner.config.vision_feature_layer,
            vision_feature_select_strategy=owner.config.vision_feature_select_strategy,
        ).pooler_output

    return hook


def _dummy_vision_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    """After that forward: add 0 × the dummy features' sum to the output, so the backward reduces the
    vision tower's gradients on every rank too (after the language model's layers, as with images, since
    the features were computed before them). A no-op on values and gradients."""
    features = getattr(module, "_vlcal_dummy_features", None)
    if features is None:
        return output
    module._vlcal_dummy_features = None
    hidden = output.last_hidden_state
    output.last_hidden_state = hidden + 0.0 * features.sum().to(hidden.dtype)
    return output


def install_dummy_vision_forward(model: Any) -> int:
    """Hook :func:`_note_images_hook`, :func:`_dummy_vision_pre_hook` (on its language model) and
    :func:`_dummy_vision_hook` on every ``InternVLModel`` inside ``model`` (FSDP-wrapped or not); return how
    many were hooked (0 for other architectures). Idempotent."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    count = 0
    for sub in model.modules():
        if isinstance(sub, InternVLModel):
            if not getattr(sub, "_vlcal_dummy_vision", False):
                sub.register_forward_pre_hook(_note_images_hook, with_kwargs=True)
                sub.language_model.register_forward_pre_hook(_dummy_vision_pre_hook(sub), with_kwargs=True)
                sub.register_forward_hook(_dummy_vision_hook, with_kwargs=True)
                sub._vlcal_dummy_vision = True
            count += 1
    return count
