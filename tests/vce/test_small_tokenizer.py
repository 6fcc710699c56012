"""The small byte-level BPE tokenizer: round trips, Qwen's special tokens and chat template, tiny models
and processors built on it (Qwen-VL, and InternVL with its image tokens appended), vision spans on its ids;
and the CPU step benchmark's reader of verl's timing metrics."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from vlcal_verl.demo.data import PALETTE, SHAPES, ImageFacts, user_message, warm_start_target
from vlcal_verl.protocol import vision_char_span
from vlcal_verl.spans import parse_responses_ids, vision_token_span
from vlcal_verl.testing.small_tokenizer import SMALL_VOCAB, small_tokenizer, train_small_tokenizer
from vlcal_verl.testing.tokenizer import CHAT_TEMPLATE, QWEN_ADDED_TOKENS, qwen_tokenizer

TEXTS = [
    "What color is the shape?",
    "Does this image not contain a teal triangle?",
    "<think><vision>The image shows a brown circle.</vision><reasoning>x</reasoning></think>\n\\boxed{brown}",
    "words the corpus never had: zebra, quixotic, 3.14159, x^2 + y^2 = z^2",
    "两只狗 and a 🐈‍⬛, naïve café, мяч, γάτα",
    "  leading spaces,\ttabs\n\nand\r\nnewlines  ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def test_vocabulary_is_small_and_byte_complete(tok):
    assert 256 < len(tok) <= SMALL_VOCAB + len(QWEN_ADDED_TOKENS)
    # every byte is a token of its own: any text encodes without an unknown token
    assert tok.unk_token_id is None
    ids = tok.encode(bytes(range(1, 128)).decode("ascii"), add_special_tokens=False)
    assert tok.decode(ids) == bytes(range(1, 128)).decode("ascii")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_offsets(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    # offsets tile the text (byte-level BPE: no character is skipped or repeated)
    covered = [i for s, e in enc["offset_mapping"] for i in range(s, e)]
    assert sorted(set(covered)) == list(range(len(text)))


def test_corpus_words_are_single_tokens(tok):
    # what the tokenizer is for: the run's words cost one token each, fewer than with Qwen's tokenizer
    for word in (" rectangle", " triangle", " teal", " image", "_confidence", " shape"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    target = warm_start_target("is there a red shape?", "yes", ImageFacts("red", "circle"), random.Random(0))
    assert len(tok.encode(target)) < len(qwen_tokenizer().encode(target))


def test_special_tokens_match_qwen(tok):
    first = tok.convert_tokens_to_ids("<|endoftext|>")
    for i, (token, special) in enumerate(QWEN_ADDED_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [first + i]  # one id, Qwen's order
        assert tok.added_tokens_decoder[first + i].special == special, token
    assert first + len(QWEN_ADDED_TOKENS) == len(tok)  # right after the BPE vocabulary, as in Qwen
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok.encode("<think>a</think><|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"  # <think> is not special


def test_chat_template_renders_as_qwen(tok):
    messages = user_message("what shape is in the image?")
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.chat_template == CHAT_TEMPLATE
    assert text == qwen_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3 and ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 1
    assert tok.decode(ids) == text


def test_training_is_deterministic_and_checks_size(tok):
    again = train_small_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_small_tokenizer(["abc"], vocab_size=100)


def test_tiny_model_and_processor_with_small_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from vlcal_verl.evaluation.hf_generate import encode_prompts
    from vlcal_verl.testing.tiny_models import build_tiny_vlm, generation_kwargs, load_tiny_vlm
    from vlcal_verl.verl_ext.cpu_backend.hf_inputs import banned_token_ids

    path = build_tiny_vlm("qwen3-vl", cache_dir=tmp_path, tokenizer="small")
    assert path.name.endswith("-small-seed0")
    processor = AutoProcessor.from_pretrained(path)  # as verl loads it from the model folder
    config = AutoConfig.from_pretrained(path)
    tok = processor.tokenizer
    assert len(tok) == config.text_config.vocab_size == len(small_tokenizer())
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
    names |= {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    for key, token in names.items():
        assert getattr(config, key) == tok.convert_tokens_to_ids(token), key
    assert processor.image_token_id == config.image_token_id
    assert config.text_config.eos_token_id == tok.eos_token_id
    vision = [tok.convert_tokens_to_ids(t) for t in (*names.values(), "<|vision_pad|>")]
    assert banned_token_ids(processor, config) == sorted(vision)  # what verl's CPU rollout never samples

    model, processor = load_tiny_vlm("qwen3-vl", cache_dir=tmp_path, tokenizer="small")
    image = Image.new("RGB", (128, 128), (255, 0, 0))
    enc = encode_prompts(processor, [user_message("what color is the shape?")], [image])
    t, h, w = enc["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 8, 8) and int((enc["input_ids"] == config.image_token_id).sum()) == h * w // 4
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=12, do_sample=True, **generation_kwargs(processor))
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert new and max(new) < len(tok) and not set(new) & set(vision)


def test_internvl_on_the_small_tokenizer(tmp_path, tok):
    """InternVL's image tokens appended to the small BPE: the model's vocabulary is the tokenizer's, the
    processor expands an image into <img> + 4 context tokens per tile + </img>, and a forward runs."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlcal_verl.testing.tiny_internvl import INTERNVL_TOKENS, TILE
    from vlcal_verl.testing.tiny_models import build_tiny_vlm, generation_kwargs
    from vlcal_verl.verl_ext.cpu_backend.hf_inputs import banned_token_ids
    from vlcal_verl.verl_ext.model_config import internvl_processor

    path = build_tiny_vlm("internvl", cache_dir=tmp_path, tokenizer="small")
    assert path.name.endswith("-small-seed0")
    config = AutoConfig.from_pretrained(path)
    processor = internvl_processor(str(path), config)  # as verl loads it (checks tiles and image token)
    itok = processor.tokenizer
    # the four InternVL tokens right after the small BPE's own vocabulary and Qwen's added tokens
    assert len(itok) == len(tok) + 4 == config.text_config.vocab_size
    names = list(INTERNVL_TOKENS.values())
    assert [itok.convert_tokens_to_ids(t) for t in names] == list(range(len(tok), len(tok) + 4))
    assert config.image_token_id == itok.convert_tokens_to_ids("<IMG_CONTEXT>") == processor.image_token_id
    for key, token in (("bos", "<|endoftext|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>")):
        assert getattr(config.text_config, f"{key}_token_id") == tok.convert_tokens_to_ids(token), key
    for text in TEXTS:  # ordinary text encodes as on the small tokenizer and round-trips
        assert itok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert itok.decode(itok.encode(text, add_special_tokens=False)) == text
    # a 2:1 image is cut into 2 tiles plus a thumbnail: 3 tiles of 4 context tokens
    image = Image.new("RGB", (4 * TILE, 2 * TILE), (255, 0, 0))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is it?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    assert tuple(enc["pixel_values"].shape) == (3, 3, TILE, TILE)
    expanded = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 12 + "</img>")
    assert enc["input_ids"][0].tolist() == itok.encode(expanded, add_special_tokens=False)
    assert int(enc["input_ids"].max()) < config.text_config.vocab_size
    banned = banned_token_ids(processor, config)  # what verl's CPU rollout never samples
    assert {itok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")} <= set(banned)
    assert max(banned) < len(itok)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(itok)) and torch.isfinite(logits).all()
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=8, do_sample=True, **generation_kwargs(processor))
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert new and max(new) < len(itok) and not set(new) & set(banned)
    # vision spans on the InternVL tokenizer's ids, as on the small tokenizer's
    response = _responses()[0]
    span = vision_token_span(itok.encode(response, add_special_tokens=False), itok)
    assert span is not None and span == vision_token_span(tok.encode(response, add_special_tokens=False), tok)


def test_family_and_tokenizer_checks():
    from vlcal_verl.demo.config import DemoConfig
    from vlcal_verl.testing.tiny_models import build_tiny_vlm, check_family_tokenizer

    assert DemoConfig().tokenizer == "qwen"
    for family in ("qwen3-vl", "qwen2.5-vl", "internvl"):
        for tokenizer in ("qwen", "small"):
            check_family_tokenizer(family, tokenizer)
            DemoConfig.from_dict({"tokenizer": tokenizer, "model_family": family})
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        build_tiny_vlm("internvl", tokenizer="gpt2")
    with pytest.raises(ValueError, match="family must be one of"):
        build_tiny_vlm("llava", tokenizer="small")
    with pytest.raises(ValueError, match=r"demo.tokenizer: tokenizer must be one of"):
        DemoConfig.from_dict({"tokenizer": "gpt2", "model_family": "internvl"})


def _responses() -> list[str]:
    rng = random.Random(1)
    out = [
        warm_start_target(q, a, ImageFacts(c, s), rng)
        for q, a, c, s in [
            ("what color is the shape?", "teal", "teal", "triangle"),
            ("is there a circle?", "no", "gray", "rectangle"),
            ("does the image not contain a blue shape?", "yes", "green", "circle"),
        ]
    ]
    colours, shapes = list(PALETTE), list(SHAPES)
    out += [
        "<think>< vision >  a  red\tcircle </ vision><reasoning>so</reasoning></think>",  # spaced tags
        "<think><vision>two 🐈‍⬛ and 两只狗, naïve</vision></think>",  # multi-byte characters in z_vis
        "<think><vision>x</vision><vision>y</vision>",  # the first block only
        "<think><vision></vision>empty",  # empty z_vis: no span
        "<think><vision>never closed",
        f"pre<vision>{' '.join(colours + shapes)}</vision>post",
    ]
    return out


@pytest.mark.parametrize("text", _responses())
def test_vision_span_equals_the_character_range(tok, text):
    """The span on token ids covers exactly the tokens whose characters overlap z_vis's character range
    (``protocol.vision_char_span``), from the tokenizer's own offsets."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    chars = vision_char_span(text)
    expected = None
    if chars is not None and chars[0] < chars[1]:
        hit = [k for k, (s, e) in enumerate(offsets) if s < chars[1] and e > chars[0]]
        expected = (hit[0], hit[-1] + 1)
    assert vision_token_span(ids, tok) == expected
    # as the trainer calls it: verl's responses, right-padded, eos then pad ids
    eos, pad = tok.eos_token_id, tok.pad_token_id
    row = torch.tensor([[*ids, eos, pad, pad]])
    ((parsed, span),) = parse_responses_ids(row, tok, stop_ids={eos, pad})
    assert span == expected
    if expected is not None:
        assert text[chars[0] : chars[1]] in tok.decode(ids[expected[0] : expected[1]])
        assert parsed.vision is None or parsed.vision == text[chars[0] : chars[1]].strip()


# ----------------------------------------------------------------------------- the step-time benchmark
def test_benchmark_reads_verl_timing_metrics(tmp_path, monkeypatch, benchmark_script):
    """Metrics written by verl's own ``compute_timing_metrics`` and ``file`` logger are read back per
    phase; rest = step − the four phases; the mean skips step 1."""
    from verl import DataProto
    from verl.trainer.ppo.metric_utils import compute_data_metrics, compute_timing_metrics
    from verl.utils.tracking import FileLogger

    bench = benchmark_script("verl_cpu_step")
    batch = DataProto.from_dict(
        tensors={
            "prompts": torch.ones(2, 3, dtype=torch.long),
            "responses": torch.ones(2, 3, dtype=torch.long),
            "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
            "response_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
            "token_level_scores": torch.zeros(2, 3),
            "token_level_rewards": torch.zeros(2, 3),
            "advantages": torch.zeros(2, 3),
            "returns": torch.zeros(2, 3),
        }
    )
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "m.jsonl"))
    logger = FileLogger("p", "e")
    raw = [  # gen, old_log_prob, vce (inside it), ref, update_actor, reward, step
        dict(gen=9.0, old_log_prob=20.0, vce=5.0, ref=4.0, update_actor=19.0, reward=1.0, step=60.0),
        dict(gen=3.0, old_log_prob=2.0, vce=1.0, ref=1.0, update_actor=2.5, reward=0.5, step=10.0),
        dict(gen=5.0, old_log_prob=4.0, vce=2.0, ref=2.0, update_actor=3.5, reward=0.5, step=16.0),
    ]
    for k, timing in enumerate(raw, start=1):
        logger.log(compute_timing_metrics(batch, timing) | compute_data_metrics(batch, use_critic=False), k)
    logger.log({"val-core/acc": 0.5}, 4)  # a line without a step time is ignored
    logger.finish()

    steps = bench.read_steps(tmp_path / "m.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]
    first = bench.step_phases(steps[0]["data"])
    assert first["generation"] == 9.0 and first["old log-prob (+ fused VCE)"] == 20.0
    assert first["reference"] == 4.0 and first["update"] == 19.0 and first["rest"] == pytest.approx(8.0)
    summary = bench.summarize(steps)
    assert summary["step"] == pytest.approx(13.0) and summary["step 1"] == 60.0
    assert summary["generation"] == pytest.approx(4.0) and summary["rest"] == pytest.approx(1.5)
    assert summary["driver-side VCE (part of old log-prob)"] == pytest.approx(1.5)
    assert summary["prompt_length/mean"] == pytest.approx(2.5)  # prompt tokens 2 and 3
    assert summary["response_length/mean"] == pytest.approx(2.5)
    table = bench.format_table({"demo": summary, "science": summary}, {"rollouts": {"demo": "4 × 4"}})
    assert "| **step (mean of steps 2..)** (s) | **13.0** | **13.0** |" in table
    assert "| rollouts | 4 × 4 |  |" in table


def test_benchmark_rejects_bad_arguments(capsys, benchmark_script):
    bench = benchmark_script("verl_cpu_step")
    for argv, word in ((["--steps", "1"], "--steps"), (["--settings", "fast"], "unknown setting")):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(argv)
        assert exc.value.code == 2 and word in capsys.readouterr().err
