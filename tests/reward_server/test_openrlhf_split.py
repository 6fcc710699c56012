"""/get_reward's response location inside OpenRLHF's decoded query (pure function, no server)."""

from __future__ import annotations

from reward_server.openrlhf import split_response

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QUESTION = "How many apples are on the table? Put the answer in \\boxed{}.<|im_end|>\n"
GEN = "<|im_start|>assistant\n"
RESPONSE = "<think><vision>three apples</vision><reasoning>count</reasoning></think>\\boxed{3}"


def qwen_vl(n_pads: int) -> str:
    return (
        f"{SYSTEM}<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * n_pads}<|vision_end|>{QUESTION}{GEN}"
    )


def test_prefix():
    prompt = qwen_vl(1)
    assert split_response(prompt + RESPONSE, prompt) == (RESPONSE, "prefix")


def test_expanded_image_tokens_are_found_by_the_prompt_tail():
    # the prompt has one placeholder; the decoded query has the placeholder expanded to 256 tokens
    assert split_response(qwen_vl(256) + RESPONSE, qwen_vl(1)) == (RESPONSE, "prompt_suffix")


def test_a_response_that_repeats_a_short_prompt_tail_is_kept_whole():
    prompt = "<img><pad></img>Q: how many? A:"
    response = " I would say A: 3, i.e. \\boxed{3}"
    query = "<img><pad><pad><pad></img>Q: how many? A:" + response
    assert split_response(query, prompt) == (response, "prompt_suffix")


def test_assistant_marker_when_the_prompt_tail_does_not_survive_decoding():
    # the prompt ends in a space the decoder dropped: no 16-character tail of it is in the query
    prompt = "<image>\nCount them.\nAnswer briefly. " + GEN + " "
    query = "<image><image>\n" + "count them" + GEN + RESPONSE
    assert split_response(query, prompt) == (RESPONSE, "assistant_marker")


def test_not_found_and_no_prompt():
    assert split_response("3 apples, \\boxed{3}", "What is in the picture? Answer:\n") == (None, "not_found")
    assert split_response(RESPONSE, None) == (RESPONSE, "no_prompt")
    assert split_response(RESPONSE, "") == (RESPONSE, "no_prompt")
