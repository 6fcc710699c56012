"""Answer benchmark items under the protocol: HF ``generate`` (CPU, tiny models) or vLLM (GPU).

Items are ``data.easy_vqa.VQAItem``-like (uid, question, answer, image, kind, data_source). The HF path
reuses the local engine's batched prompt encoding and sampling (image tokens suppressed), so the demo's
evaluation and ``vlcal eval`` generate the same way. Generation returns raw texts; scoring is
``rewards.score_many`` (the training reward's own parser and grader), so evaluation cannot drift from
what training optimises.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm


@dataclass
class GenerationSettings:
    """Sampling for evaluation (authors' validation: temperature 0.6, top_p 0.95)."""

    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    batch_size: int = 16
    seed: int = 0
    protocol: str = "decoupled"


def load_hf_model(name: str):
    """``tiny:qwen3-vl`` / ``tiny:qwen2.5-vl`` (built offline) or a local/hub checkpoint → (model, processor)."""
    if name.startswith("tiny:"):
        from vlcal_verl.testing.tiny_models import load_tiny_vlm

        return load_tiny_vlm(name.removeprefix("tiny:"))
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(name), AutoProcessor.from_pretrained(name)


@dataclass(frozen=True)
class BenchItem:
    """A prepared benchmark row (``vlcal data bench`` parquet) ready to generate on; several images allowed."""

    uid: str
    question: str
    answer: str
    images: tuple[Any, ...]
    kind: str
    data_source: str
    unanswerable: bool = False


def _images(item: Any) -> list[Any]:
    return list(item.images) if hasattr(item, "images") else [item.image]


def load_bench_items(path: str | Path, limit: int | None = None) -> list[BenchItem]:
    """Rows of a ``vlcal data bench`` parquet file → ``BenchItem`` (question without the instructions)."""
    import io

    from PIL import Image

    from vlcal_verl.data.schema import read_parquet, validate_rows

    rows = read_parquet(path)[:limit]
    validate_rows(rows)
    return [
        BenchItem(
            uid=r["extra_info"]["uid"],
            question=r["extra_info"]["question"],
            answer=r["reward_model"]["ground_truth"],
            images=tuple(Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in r["images"]),
            kind=r["extra_info"]["answer_kind"],
            data_source=r["data_source"],
            unanswerable=bool(r["extra_info"]["unanswerable"]),
        )
        for r in rows
    ]


def _messages(question: str, protocol: str, n_images: int = 1) -> list[dict[str, Any]]:
    from vlcal_verl.data.schema import chat_messages

    return chat_messages(question, protocol, n_images)


def generate_hf(model, processor, items: Sequence[Any], settings: GenerationSettings) -> list[str]:
    """Batched HF generation, one response per item (greedy when temperature is 0)."""
    import torch

    from vlcal_verl.evaluation.hf_generate import encode_prompts, generate

    model.eval()
    gen = torch.Generator().manual_seed(settings.seed)
    texts: list[str] = []
    bs = settings.batch_size
    for start in tqdm(range(0, len(items), bs), desc="generate", unit="batch"):
        chunk = items[start : start + bs]
        prompt = encode_prompts(
            processor,
            [_messages(it.question, settings.protocol, len(_images(it))) for it in chunk],
            [im for it in chunk for im in _images(it)],
        )
        ro = generate(
            model,
            processor,
            prompt,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            # 0 = no top-k cut: full-vocabulary sampling. (tokenizer.vocab_size, 151,643, is below the
            # 151,936 logits, so it would run a ~152K-wide topk every step: ~3.6x the sampling cost.)
            top_k=settings.top_k,
            top_p=settings.top_p,
            generator=gen,
        )
        texts.extend(ro.texts)
    return texts


@functools.lru_cache(maxsize=1)
def _vllm_engine(model_path: str, tp: int, seed: int):
    """(vllm.LLM, processor), built once per process: ``vlcal eval`` calls ``generate_vllm`` once per
    benchmark, and a second ``LLM`` would find the GPU memory held by the first."""
    try:
        from vllm import LLM
    except ImportError as err:
        raise RuntimeError(
            "--backend vllm needs vLLM (GPU): pip install -e '.[gpu]'; use --backend hf on a CPU"
        ) from err
    from transformers import AutoProcessor

    llm = LLM(model=model_path, tensor_parallel_size=tp, limit_mm_per_prompt={"image": 8}, seed=seed)
    return llm, AutoProcessor.from_pretrained(model_path)


def generate_vllm(
    model_path: str, items: Sequence[Any], settings: GenerationSettings, tp: int = 1
) -> list[str]:
    """vLLM generation (GPU). Needs ``pip install -e '.[gpu]'``; the engine is reused across calls."""
    llm, processor = _vllm_engine(model_path, tp, settings.seed)  # clear error first when vLLM is missing
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_new_tokens
    )
    requests = [
        {
            "prompt": processor.apply_chat_template(
                _messages(it.question, settings.protocol, len(_images(it))),
                add_generation_prompt=True,
                tokenize=False,
            ),
            "multi_modal_data": {"image": _images(it)},
        }
        for it in items
    ]
    outputs = llm.generate(requests, params)
    return [o.outputs[0].text for o in outputs]


def score_generations(rows: Sequence[dict[str, Any]], protocol: str = "decoupled") -> list[dict[str, Any]]:
    """Rows with ``response``, ``ground_truth`` (+ benchmark, uid, answer_kind, unanswerable) → report records."""
    from vlcal_verl.config import RewardConfig
    from vlcal_verl.rewards import score_many

    triples = [(r["response"], r["ground_truth"], r.get("answer_kind")) for r in rows]
    scored = score_many(triples, config=RewardConfig(protocol=protocol), progress=len(rows) > 200)
    records = []
    for r, s in zip(rows, scored, strict=True):
        records.append(
            {
                **{k: r[k] for k in ("uid", "benchmark", "s_vis") if k in r},
                "benchmark": r.get("benchmark", "generations"),
                "unanswerable": bool(r.get("unanswerable", False)),
                "confidence": s["confidence"],
                "correct": bool(s["accuracy"]),
                "parse_ok": bool(s["parse_ok"]),
                "vision_confidence": s["vision_confidence"],
                "reasoning_confidence": s["reasoning_confidence"],
                "grading_status": s["grading_status"],
            }
        )
    return records
