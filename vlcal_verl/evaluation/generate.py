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
    sampler: str = "cdf"  # HF backend, no top-k: "cdf" (fast) or "sorted" (the earlier path); hf_generate
    threads: int | None = None  # HF backend: torch threads while generating; None: generation_threads()


SMALL_MODEL_PARAMS = 100_000_000


def generation_threads(model) -> int:
    """Torch intra-op threads for HF generation: 1 for a model under 100M parameters, else torch's own.

    A tiny model's ops take microseconds, so a second thread mostly adds synchronisation; on a shared
    machine each parallel op also waits for every thread to be scheduled. Measured on the tiny Qwen3-VL,
    2 cores under load: 1 thread ran ~10× faster than 2 (README, Benchmarks: eval speed).
    """
    import torch

    n_params = sum(p.numel() for p in model.parameters())
    return 1 if n_params < SMALL_MODEL_PARAMS else torch.get_num_threads()


def load_hf_model(name: str):
    """``tiny:qwen3-vl`` / ``tiny:qwen2.5-vl`` / ``tiny:internvl`` (built offline) or a local/hub checkpoint → (model, processor)."""
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


@dataclass(frozen=True)
class Generation:
    """One generated response: its text (end-of-turn token removed), ``n_tokens`` generated (end-of-turn
    included), ``truncated`` (stopped at the token limit without end-of-turn) and, from the HF backend,
    the response token ids (what VCE runs on)."""

    text: str
    n_tokens: int
    truncated: bool
    token_ids: tuple[int, ...] = ()


def _prompt_text(processor, item: Any, protocol: str) -> str:
    return processor.apply_chat_template(
        _messages(item.question, protocol, len(_images(item))), add_generation_prompt=True, tokenize=False
    )


def generate_hf(model, processor, items: Sequence[Any], settings: GenerationSettings) -> list[Generation]:
    """Batched HF generation, one response per item (greedy when temperature is 0), tqdm over items, with
    torch's thread count set to ``settings.threads`` (default :func:`generation_threads`) and restored."""
    import torch

    model.eval()
    gen = torch.Generator().manual_seed(settings.seed)
    out: list[Generation] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads or generation_threads(model))
    try:
        _generate_batches(model, processor, items, settings, gen, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _generate_batches(model, processor, items, settings: GenerationSettings, gen, out: list) -> None:
    """``generate_hf``'s loop: batches of ``settings.batch_size`` items, appended to ``out``."""
    from vlcal_verl.evaluation.hf_generate import encode_prompts, generate, special_ids

    eos = special_ids(processor.tokenizer)[0]
    bs = settings.batch_size
    with tqdm(total=len(items), desc="generate", unit="item") as bar:
        for start in range(0, len(items), bs):
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
                sampler_method=settings.sampler,
            )
            for row, mask, text in zip(ro.responses, ro.response_mask, ro.texts, strict=True):
                ids = row[: int(mask.sum())].tolist()
                out.append(Generation(text, len(ids), not ids or ids[-1] != eos, tuple(ids)))
            bar.update(len(chunk))


@dataclass(frozen=True)
class VLLMOptions:
    """Engine shape for ``--backend vllm``: ``tp`` GPUs per engine, ``dp`` engines (one per GPU group,
    items sharded round-robin between them and merged back in order), and vLLM's memory knobs."""

    tp: int = 1
    dp: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None

    def engine_kwargs(self, model_path: str, seed: int) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM`` (options left at None are vLLM's defaults)."""
        kw: dict[str, Any] = {
            "model": model_path,
            "tensor_parallel_size": self.tp,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": 8},
            "seed": seed,
        }
        if self.max_model_len is not None:
            kw["max_model_len"] = self.max_model_len
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        return kw


def gpu_groups(dp: int, tp: int, visible: str | None = None) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each of the ``dp`` engines: consecutive blocks of ``tp`` devices taken
    from ``visible`` (the caller's own ``CUDA_VISIBLE_DEVICES``; default ``0 … dp·tp−1``).

    >>> gpu_groups(2, 2), gpu_groups(2, 1, "4,5,6")
    (['0,1', '2,3'], ['4', '5'])
    """
    if dp < 1 or tp < 1:
        raise ValueError(f"--dp and --tp must be >= 1, got dp={dp}, tp={tp}")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    if devices is None:
        devices = [str(i) for i in range(dp * tp)]
    if len(devices) < dp * tp:
        raise ValueError(
            f"--dp {dp} × --tp {tp} needs {dp * tp} GPUs but CUDA_VISIBLE_DEVICES lists {len(devices)}"
        )
    return [",".join(devices[g * tp : (g + 1) * tp]) for g in range(dp)]


def shard_indices(n: int, dp: int) -> list[list[int]]:
    """Round-robin shards of ``range(n)`` (similar prompt-length mixes per engine); empty ones dropped.

    >>> shard_indices(5, 2), shard_indices(1, 3)
    ([[0, 2, 4], [1, 3]], [[0]])
    """
    return [list(range(g, n, dp)) for g in range(dp) if g < n]


def merge_shards(shards: Sequence[Sequence[int]], results: Sequence[Sequence[Any]]) -> list[Any]:
    """Put each shard's results back at its items' original positions.

    >>> merge_shards([[0, 2], [1]], [["a", "c"], ["b"]])
    ['a', 'b', 'c']
    """
    n = sum(len(s) for s in shards)
    out: list[Any] = [None] * n
    for idx, res in zip(shards, results, strict=True):
        if len(idx) != len(res):
            raise RuntimeError(f"a vLLM engine returned {len(res)} outputs for {len(idx)} requests")
        for i, r in zip(idx, res, strict=True):
            out[i] = r
    if sorted(i for s in shards for i in s) != list(range(n)):
        raise ValueError("shards must partition range(n)")
    return out


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError(
            "--backend vllm needs vLLM (GPU): pip install -e '.[gpu]'; use --backend hf on a CPU"
        ) from err
    return vllm


@functools.lru_cache(maxsize=1)
def _vllm_engine(engine_kwargs: str):
    """``vllm.LLM`` built once per process (``engine_kwargs``: JSON of its keyword arguments): a second
    ``LLM`` would find the GPU memory held by the first."""
    import json

    return _import_vllm().LLM(**json.loads(engine_kwargs))


def _as_generation(output: Any) -> Generation:
    o = output.outputs[0]
    return Generation(o.text, len(o.token_ids), o.finish_reason == "length")


def _dp_worker(env: dict[str, str], engine_kwargs: dict[str, Any], requests: list, params: dict) -> list:
    """One data-parallel engine, in its own spawned process: set its GPUs before vLLM is imported."""
    import os

    os.environ.update(env)
    vllm = _import_vllm()
    llm = vllm.LLM(**engine_kwargs)
    return [_as_generation(o) for o in llm.generate(requests, vllm.SamplingParams(**params))]


def _spawn_engines(jobs: list[tuple[dict[str, str], dict[str, Any], list, dict]]) -> list[list[Generation]]:
    """Run each job in its own spawned process, all at once; results in job order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    pools = [ProcessPoolExecutor(max_workers=1, mp_context=ctx) for _ in jobs]
    try:
        futures = [pool.submit(_dp_worker, *job) for pool, job in zip(pools, jobs, strict=True)]
        return [f.result() for f in futures]
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)


def sampling_params(settings: GenerationSettings) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments of the evaluation settings (top-k only when set)."""
    params: dict[str, Any] = {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_tokens": settings.max_new_tokens,
        "seed": settings.seed,
    }
    if settings.top_k > 0:
        params["top_k"] = settings.top_k
    return params


def generate_vllm(
    model_path: str,
    items: Sequence[Any],
    settings: GenerationSettings,
    options: VLLMOptions | None = None,
    launcher: Any = None,
) -> list[Generation]:
    """vLLM generation (GPU; ``pip install -e '.[gpu]'``), one response per item, in item order.

    ``options.dp`` 1: one engine in this process, reused across calls. ``dp`` > 1: ``launcher(jobs)``
    (default: one spawned process per job) runs one engine per GPU group (:func:`gpu_groups`) on a
    round-robin shard of the items (:func:`shard_indices`); results are merged back in order.
    """
    import json
    import os

    options = options or VLLMOptions()
    engine_kwargs = options.engine_kwargs(model_path, settings.seed)
    if options.dp == 1:
        llm = _vllm_engine(
            json.dumps(engine_kwargs, sort_keys=True)
        )  # clear error first when vLLM is missing
    else:
        _import_vllm()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    requests = [
        {"prompt": _prompt_text(processor, it, settings.protocol), "multi_modal_data": {"image": _images(it)}}
        for it in items
    ]
    params = sampling_params(settings)
    if options.dp == 1:
        from vllm import SamplingParams

        return [_as_generation(o) for o in llm.generate(requests, SamplingParams(**params))]
    groups = gpu_groups(options.dp, options.tp, os.environ.get("CUDA_VISIBLE_DEVICES"))
    shards = shard_indices(len(requests), options.dp)
    jobs = [
        ({"CUDA_VISIBLE_DEVICES": g}, engine_kwargs, [requests[i] for i in idx], params)
        for g, idx in zip(groups, shards, strict=False)
    ]
    return merge_shards(shards, (launcher or _spawn_engines)(jobs))


RECORD_KEYS = (
    "uid",
    "benchmark",
    "answer",
    "ground_truth",
    "correct",
    "vision_confidence",
    "reasoning_confidence",
    "confidence",
    "parse_ok",
    "failure",
    "truncated",
    "n_tokens",
    "s_vis",
)
"""The per-item fields every ``generations.jsonl`` record of a report has (null where unknown)."""


def score_generations(rows: Sequence[dict[str, Any]], protocol: str = "decoupled") -> list[dict[str, Any]]:
    """Rows with ``response``, ``ground_truth`` (+ benchmark, uid, answer_kind, unanswerable, truncated,
    n_tokens, VCE fields) → per-item report records: :data:`RECORD_KEYS`, then ``unanswerable``,
    ``answer_kind``, ``grading_status``, the VCE values ``k_bar``/``h_bar``/``s`` when present, the
    question and the response (so a report's ``generations.jsonl`` can be scored again)."""
    from vlcal_verl.config import RewardConfig
    from vlcal_verl.protocol import parse_response
    from vlcal_verl.rewards import score_many

    triples = [(r["response"], r["ground_truth"], r.get("answer_kind")) for r in rows]
    scored = score_many(triples, config=RewardConfig(protocol=protocol), progress=len(rows) > 200)
    records = []
    for r, s in zip(rows, scored, strict=True):
        parsed = parse_response(r["response"], protocol)
        truncated = r.get("truncated")
        records.append(
            {
                "uid": r.get("uid"),
                "benchmark": r.get("benchmark", "generations"),
                "answer": parsed.answer,
                "ground_truth": r["ground_truth"],
                "correct": bool(s["accuracy"]),
                "vision_confidence": s["vision_confidence"],
                "reasoning_confidence": s["reasoning_confidence"],
                "confidence": s["confidence"],
                "parse_ok": bool(s["parse_ok"]),
                "failure": parsed.failure,
                "truncated": None if truncated is None else bool(truncated),
                "n_tokens": r.get("n_tokens"),
                "s_vis": r.get("s_vis"),
                "unanswerable": bool(r.get("unanswerable", False)),
                "answer_kind": r.get("answer_kind"),
                "grading_status": s["grading_status"],
                **{k: r[k] for k in ("k_bar", "h_bar", "s") if k in r},
                "question": r.get("question"),
                "response": r["response"],
            }
        )
    return records
