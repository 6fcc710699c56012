"""Rollouts and response log-probabilities for the local engine (HF ``generate`` + one forward).

Two CPU-specific choices:

- Sampling is done by :class:`TopKSampler`, a logits processor that draws the next token itself
  (temperature, top-k, top-p, from a seeded ``torch.Generator``) and hands ``generate`` a one-hot score, so
  ``generate`` runs in greedy mode. HF's own sampler calls ``torch.multinomial`` over the full 152k Qwen
  vocabulary, which costs ~0.1 s per token for 32 rows on two cores; top-k first is ~40x cheaper.
  The seeded generator also makes rollouts reproducible across ``--resume``.
- Without a top-k cut, the default ``"cdf"`` method draws from the full vocabulary by inverse CDF and
  keeps a draw only if it lies in the top-p nucleus (:func:`sample_nucleus`): no sort. The ``"sorted"``
  method (the earlier one) sorts candidates until they hold the nucleus; a near-flat distribution (a
  random or badly calibrated model) needs the whole 152k vocabulary sorted at every step, which was ~75%
  of ``vlcal eval``'s time on the tiny model. Both draw from the same distribution; their random streams
  differ, so sampled texts differ for one seed (greedy decoding is identical).
- Log-probabilities apply the LM head to *response positions only* (the prompt's ~300 positions never
  need [tokens × 152k] logits) via the model's decoder (``model.model``) and ``model.lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

# tokens a policy must never emit: vision placeholders (Qwen-VL's, then InternVL's)
IMAGE_TOKEN_NAMES = (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
)  # fmt: skip
SAMPLER_METHODS = ("cdf", "sorted")


class TopKSampler(LogitsProcessor):
    """Draw the next token (temperature, then top-k, then top-p; argmax when temperature == 0) and return
    it one-hot.

    ``scores`` [batch, vocab] → [batch, vocab] with 0 at the drawn token and -inf elsewhere. ``top_k`` 0
    means no top-k cut; ``top_p`` < 1 keeps the smallest set of most likely tokens whose probability
    reaches ``top_p`` (nucleus sampling, as vLLM and HF do; within the top-k when both are set).
    ``method`` (see the module docstring) only matters without a top-k cut: ``"cdf"`` (default, fast) or
    ``"sorted"`` (the earlier path, kept for comparison: ``benchmarks/bench_eval_speed.py``).
    """

    def __init__(
        self,
        temperature: float,
        top_k: int,
        generator: torch.Generator | None,
        suppress_ids: list[int],
        top_p: float = 1.0,
        method: str = "cdf",
    ):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if method not in SAMPLER_METHODS:
            raise ValueError(f"sampler method must be one of {SAMPLER_METHODS}, got {method!r}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.generator = generator
        self.method = method
        self.suppress_ids = torch.tensor(sorted(set(suppress_ids)), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.method == "cdf" and self.temperature > 0 and not 0 < self.top_k < scores.shape[-1]:
            logits = self._suppress(scores.float() / self.temperature)  # a new tensor: no clone needed
            choice = sample_nucleus(logits, self.top_p, self.generator)
            return logits.fill_(-float("inf")).scatter_(1, choice, 0.0)  # reused as the one-hot output
        scores = self._suppress(scores.float().clone())
        if self.temperature <= 0:
            choice = scores.argmax(-1, keepdim=True)
        else:
            logits = scores / self.temperature
            if 0 < self.top_k < logits.shape[-1]:
                top, idx = logits.topk(self.top_k, dim=-1)  # sorted, most likely first
                probs = torch.softmax(top, -1)  # top-p then applies within the top-k (as HF does)
            elif self.top_p < 1.0:
                top, idx = nucleus_candidates(logits, self.top_p)
                probs = (top - logits.logsumexp(-1, keepdim=True)).exp()  # full-vocabulary probabilities
            else:
                top, idx = logits, None
                probs = torch.softmax(top, -1)
            if self.top_p < 1.0:  # drop a token once the more likely ones already reach top_p
                before = probs.cumsum(-1) - probs
                probs = probs.masked_fill(before >= self.top_p, 0.0)
            pick = torch.multinomial(probs, 1, generator=self.generator)
            choice = pick if idx is None else idx.gather(-1, pick)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, choice, 0.0)

    def _suppress(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` with the vision placeholder tokens at -inf (in place)."""
        if len(self.suppress_ids):
            scores[:, self.suppress_ids[self.suppress_ids < scores.shape[-1]]] = -float("inf")
        return scores


def nucleus_candidates(logits: torch.Tensor, top_p: float, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens of each row, sorted, enough of them to hold the top-p nucleus.

    A full sort of a 152K vocabulary at every step is what made nucleus sampling slow. The nucleus is
    the shortest most-likely-first prefix whose probability reaches ``top_p``, so when the top ``k``
    tokens already hold ``top_p`` of the mass it lies inside them; otherwise ``k`` grows ×4 until they do
    (at worst the whole vocabulary). Exact, not an approximation. ``logits`` [B, V] → ([B, k'], [B, k']).
    """
    vocab = logits.shape[-1]
    lse = logits.logsumexp(-1, keepdim=True)
    k = min(k, vocab)
    while True:
        top, idx = logits.topk(k, dim=-1)
        if k == vocab or bool(((top - lse).exp().sum(-1) >= top_p).all()):
            return top, idx
        k = min(4 * k, vocab)


def sample_nucleus(
    logits: torch.Tensor, top_p: float, generator: torch.Generator | None, rounds: int = 8
) -> torch.Tensor:
    """One token per row from the top-p nucleus of ``softmax(logits)``, without sorting: [B, V] → [B, 1].

    Each round draws a token from the full distribution (:func:`inverse_cdf`, one uniform per row) and
    keeps it when the tokens strictly more likely than it hold less than ``top_p``, i.e. when it is in the
    nucleus: rejection sampling with the full distribution as proposal, so a kept draw is distributed as
    the renormalised nucleus, and a row is kept with probability = its nucleus mass ≥ ``top_p``. Rows
    still rejected after ``rounds`` rounds (likely only for a small ``top_p``) fall back to the sorted
    candidates of :func:`nucleus_candidates`. Tokens tied with the nucleus's least likely one are all
    kept (a sort keeps some of them, in its own order). Cost: ~4 passes over [B, V] per round, no sort.
    """
    probs = torch.softmax(logits, -1)
    choice = torch.zeros(probs.shape[0], 1, dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    for _ in range(rounds):
        p = probs if len(rows) == probs.shape[0] else probs[rows]
        frac = torch.rand(len(rows), 1, generator=generator, dtype=torch.float64, device=p.device)
        idx = inverse_cdf(p, frac)
        if top_p < 1.0:
            # mass of the tokens more likely than the drawn one (a float mask: ~10x faster than where())
            ok = (p > p.gather(-1, idx)).to(p.dtype).mul_(p).sum(-1) < top_p
        else:
            ok = torch.ones(len(rows), dtype=torch.bool, device=p.device)
        choice[rows[ok]] = idx[ok]
        rows = rows[~ok]
        if not len(rows):
            return choice
    top, idx = nucleus_candidates(logits[rows], top_p)
    kept = (top - logits[rows].logsumexp(-1, keepdim=True)).exp()
    kept = kept.masked_fill(kept.cumsum(-1) - kept >= top_p, 0.0)
    choice[rows] = idx.gather(-1, torch.multinomial(kept, 1, generator=generator))
    return choice


def inverse_cdf(probs: torch.Tensor, frac: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The token whose cumulative-probability interval holds ``frac`` × the row's total: [B, V], [B, 1]
    uniforms in [0, 1) → [B, 1] token ids, token i drawn with probability probs[i] / Σ probs.

    Two levels, so no [B, V] cumulative sum is written: per-block sums (float32 within a block of
    ``block`` tokens, float64 across blocks) pick the block, then a float64 cumulative sum of that one
    block picks the token. A single float32 cumulative sum over 152k tokens would round each token's
    interval by up to ~1% of a typical token's probability; float64 over the whole row costs two more
    full passes.
    """
    batch, vocab = probs.shape
    block = min(block, vocab)
    whole = vocab // block * block
    sums = probs[:, :whole].reshape(batch, -1, block).sum(-1)
    if whole < vocab:
        sums = torch.cat([sums, probs[:, whole:].sum(-1, keepdim=True)], dim=-1)
    sums = sums.double()
    cdf = sums.cumsum(-1)
    b = torch.searchsorted(cdf, _below(frac * cdf[:, -1:], cdf[:, -1:]), right=True)
    mass = sums.gather(-1, b)
    within = ((frac * cdf[:, -1:] - (cdf.gather(-1, b) - mass)) / mass).clamp_(0.0, 1.0)
    pos = b * block + torch.arange(block, device=probs.device)
    p_block = probs.gather(-1, pos.clamp(max=vocab - 1)).double().masked_fill_(pos >= vocab, 0.0)
    c_block = p_block.cumsum(-1)
    j = torch.searchsorted(c_block, _below(within * c_block[:, -1:], c_block[:, -1:]), right=True)
    return b * block + j


def _below(target: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``target`` capped just under ``total``: a right-sided search then lands on an interval of positive
    width (a token or block of nonzero probability), never past the last one."""
    return torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))


@dataclass
class Rollouts:
    """A batch of prompts and their sampled responses.

    ``prompt`` is the processor's output (``input_ids``/``attention_mask`` [batch, prompt_len], left-padded,
    plus ``pixel_values``, ``image_grid_thw`` …); ``responses`` [batch, response_len] right-padded with the
    pad id; ``response_mask`` [batch, response_len] (1 up to and including the end-of-turn token).
    """

    prompt: dict[str, torch.Tensor]
    responses: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]


def special_ids(tokenizer) -> tuple[int, int, list[int]]:
    """(eos id = <|im_end|>, pad id, ids to suppress) of a Qwen tokenizer."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    unk = tokenizer.unk_token_id
    suppress = [tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKEN_NAMES]
    return eos, pad, [i for i in suppress if isinstance(i, int) and i >= 0 and i != unk]


def encode_prompts(
    processor, messages: list[list[dict[str, Any]]], images: list[Any]
) -> dict[str, torch.Tensor]:
    """Chat-template and process a batch (one image per prompt), left-padded for generation."""
    tok = processor.tokenizer
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    return dict(enc)


def cut_responses(generated: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, new_tokens] → (responses, response_mask): keep tokens up to and including the first eos."""
    is_eos = generated == eos_id
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~seen_before).long()
    responses = torch.where(mask.bool(), generated, torch.full_like(generated, pad_id))
    width = max(int(mask.sum(-1).max()), 1)
    return responses[:, :width].contiguous(), mask[:, :width].contiguous()


@torch.no_grad()
def generate(
    model,
    processor,
    prompt: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    generator: torch.Generator | None,
    top_p: float = 1.0,
    sampler_method: str = "cdf",
) -> Rollouts:
    """Sample one response per prompt row (repeat rows for n rollouts) with :class:`TopKSampler`."""
    eos, pad, suppress = special_ids(processor.tokenizer)
    sampler = TopKSampler(temperature, top_k, generator, suppress, top_p=top_p, method=sampler_method)
    out = model.generate(
        **prompt,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([sampler]),
        eos_token_id=eos,
        pad_token_id=pad,
    )
    responses, mask = cut_responses(out[:, prompt["input_ids"].shape[1] :], eos, pad)
    texts = processor.tokenizer.batch_decode(
        [r[: int(m.sum())][r[: int(m.sum())] != eos] for r, m in zip(responses, mask, strict=True)],
        skip_special_tokens=False,
    )
    return Rollouts(prompt=prompt, responses=responses, response_mask=mask, texts=texts)


def full_inputs(
    prompt: dict[str, torch.Tensor], responses: torch.Tensor, response_mask: torch.Tensor
) -> dict:
    """Prompt ⊕ response model inputs: [batch, prompt_len + response_len] token-aligned tensors."""
    batch, plen = prompt["input_ids"].shape
    inputs: dict[str, Any] = {}
    for key, value in prompt.items():
        if key == "input_ids":
            inputs[key] = torch.cat([value, responses], dim=1)
        elif key == "attention_mask":
            inputs[key] = torch.cat([value, response_mask.to(value.dtype)], dim=1)
        elif torch.is_tensor(value) and value.dim() == 2 and value.shape == (batch, plen):
            inputs[key] = torch.cat([value, torch.zeros_like(responses, dtype=value.dtype)], dim=1)
        else:
            inputs[key] = value
    return inputs


def response_logits(
    model, prompt: dict[str, torch.Tensor], responses: torch.Tensor, response_mask: torch.Tensor
):
    """Logits at the positions that predict each response token: [batch, response_len, vocab] (fp32)."""
    inputs = full_inputs(prompt, responses, response_mask)
    hidden = model.model(**inputs).last_hidden_state
    plen, rlen = prompt["input_ids"].shape[1], responses.shape[1]
    return model.lm_head(hidden[:, plen - 1 : plen - 1 + rlen]).float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(y_t) from logits [batch, len, vocab] and tokens [batch, len] → [batch, len]."""
    # flat [tokens, vocab] rows: ~2x faster on CPU than cross_entropy over a transposed [B, V, L] view
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
    return -flat.view(tokens.shape)


def response_logprobs(model, prompt, responses, response_mask) -> torch.Tensor:
    """log π(y_t | prompt, y_<t) for the response tokens: [batch, response_len]."""
    return token_logprobs(response_logits(model, prompt, responses, response_mask), responses)
