"""A small byte-level BPE tokenizer for the tiny models, trained on the demo's own text.

Why: a tiny model's cost on a CPU is not its two 64-wide layers but its vocabulary. With the real Qwen
tokenizer every forward ends in fp32 logits over 151,936 embeddings (~0.6 MB a token), and verl computes
them at every rollout step, in the old-log-prob, reference and VCE passes and in the update's backward.
The easy-vqa run writes a few hundred distinct words; a BPE vocabulary of ~1,000 tokens trained on that
text encodes its prompts and responses in fewer tokens than Qwen's and makes the logits ~150× smaller.

What is kept from Qwen so that nothing downstream can tell the difference:

- byte-level BPE with GPT-2's byte↔character map and Qwen's pre-tokenizer pattern, every one of the 256
  bytes in the base alphabet: any text encodes, ids map to fixed bytes (``vlcal_verl.spans`` finds the
  vision span on the ids this way) and offsets are exact;
- Qwen's added tokens, in Qwen's order and with its special flags (``<|im_start|>``, ``<|im_end|>``,
  ``<|vision_start|>``, ``<|image_pad|>`` … ``<think>``), placed right after the BPE vocabulary as Qwen
  places them after its 151,643 ranks;
- EOS ``<|im_end|>``, pad ``<|endoftext|>`` and the same chat template, so the Qwen-VL processors accept it
  and verl loads it from the model folder like any checkpoint's tokenizer.

The corpus (:func:`training_corpus`) is the prompt template (both protocols' instructions and the chat
template's fixed text), the easy-vqa *train* split's questions and answers, and the warm start's target
templates filled with every palette colour, shape and confidence. The test split is never read, so the
held-out items play no part in it; their questions use the same templated words.
"""

from __future__ import annotations

import functools
from typing import Any

SMALL_VOCAB = 1024
"""Upper bound on the BPE vocabulary (bytes + merges); the trainer stops earlier when no pair is left
to merge inside a pre-token, as happens on this small corpus."""


def training_corpus() -> list[str]:
    """The texts the small tokenizer is trained on (deterministic; no image is opened)."""
    import random

    from vlcal_verl.data.easy_vqa import _split
    from vlcal_verl.demo.data import (
        CONFIDENCE_RANGE,
        PALETTE,
        SHAPES,
        ImageFacts,
        analysis_for,
        warm_start_target,
    )
    from vlcal_verl.protocol import DECOUPLED_INSTRUCTIONS, RLCR_INSTRUCTIONS

    rows, _ = _split("train")
    # the fixed text of every prompt, repeated so that its words, seen once each, still earn merges
    fixed = [
        DECOUPLED_INSTRUCTIONS,
        RLCR_INSTRUCTIONS,
        "You are a helpful assistant.",
        "system\nuser\nassistant\n",
    ]
    texts = fixed * 8
    texts += sorted({q for q, _, _ in rows}) + sorted({a for _, a, _ in rows})
    facts = [ImageFacts(c, s) for c in PALETTE for s in SHAPES] + [ImageFacts(None, None)]
    texts += [f.describe() for f in facts]
    texts += [analysis_for(v, r) for v in range(11) for r in range(11)]
    rng = random.Random(0)
    lo, hi = CONFIDENCE_RANGE
    for i, (question, answer, _) in enumerate(rows[:: max(1, len(rows) // 2000)]):
        rng.seed(f"corpus:{i}")
        texts.append(warm_start_target(question, answer, facts[i % len(facts)], rng))
    texts += [f"<vision_confidence>{c}</vision_confidence><reasoning_confidence>{c}</reasoning_confidence>"
              for c in range(lo - 2, hi + 2)]  # fmt: skip
    return texts


def train_small_tokenizer(texts: list[str] | None = None, vocab_size: int = SMALL_VOCAB):
    """Train the byte-level BPE on ``texts`` (default :func:`training_corpus`) and wrap it as a
    ``PreTrainedTokenizerFast`` with Qwen's added tokens, EOS, pad and chat template."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    from vlcal_verl.testing.tokenizer import QWEN_PATTERN, with_qwen_added_tokens

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be > 256 (the byte alphabet), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # with the repeated fixed texts, every word of the corpus
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts if texts is not None else training_corpus(), trainer=trainer)
    return with_qwen_added_tokens(backend, backend.get_vocab_size())


@functools.lru_cache(maxsize=2)
def small_tokenizer(vocab_size: int = SMALL_VOCAB):
    """The trained small tokenizer (cached per process; training takes about a second).

    >>> tok = small_tokenizer()
    >>> len(tok) < 2000, tok.eos_token, tok.decode(tok.encode("<think><vision>a red circle</vision>"))
    (True, '<|im_end|>', '<think><vision>a red circle</vision>')
    """
    return train_small_tokenizer(vocab_size=vocab_size)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The ids a Qwen-VL config names (image/video pads, vision start/end, bos/eos/pad), read from
    ``tokenizer`` so a model built for it agrees with its processor."""
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "bos_token_id": "<|endoftext|>",
        "eos_token_id": "<|im_end|>",
        "pad_token_id": "<|endoftext|>",
    }
    return {k: int(tokenizer.convert_tokens_to_ids(v)) for k, v in ids.items()}
