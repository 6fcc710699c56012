"""Fast checks of the local engine's parts: recipe loading, warm-start targets, sampler, response cutting."""

from __future__ import annotations

import random

import pytest
import torch

from vlcal_verl.demo.config import DemoConfig
from vlcal_verl.demo.data import PALETTE, image_facts, warm_start_target
from vlcal_verl.evaluation.hf_generate import TopKSampler, cut_responses


def test_image_facts_match_easy_vqa_answers():
    from vlcal_verl.data.easy_vqa import load_easy_vqa

    checked = 0
    for item in load_easy_vqa("test", limit=300, seed=1):
        facts = image_facts(item.image)
        if item.question.startswith(("what color", "what is the color")):
            assert facts.color == item.answer, item.question
            checked += 1
        if item.answer in ("circle", "rectangle", "triangle"):
            assert facts.shape == item.answer, item.question
            checked += 1
    assert checked > 20


def test_blank_image_has_no_shape():
    from PIL import Image

    assert image_facts(Image.new("RGB", (64, 64), (255, 255, 255))).describe() == "The image shows no shape."


def test_warm_start_targets_are_well_formed_protocol():
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.protocol import parse_response

    rng = random.Random(0)
    confidences = set()
    for item in load_easy_vqa("train", limit=60, seed=2):
        facts = image_facts(item.image)
        parsed = parse_response(warm_start_target(item.question, item.answer, facts, rng))
        assert parsed.format_ok and parsed.parse_ok, parsed.failure
        assert parsed.answer == item.answer
        assert parsed.vision.startswith("The image shows a") and (facts.color or "") in parsed.vision
        confidences.add((parsed.vision_confidence, parsed.reasoning_confidence))
    assert len(confidences) > 10, "confidence targets must be spread out, not one fixed value"
    assert all(0.2 <= c <= 0.9 for pair in confidences for c in pair)
    assert len(PALETTE) == 8


def test_sampler_respects_top_k_suppression_and_seed():
    scores = torch.zeros(3, 10)
    scores[:, 7] = 100.0  # suppressed: must never be drawn
    scores[:, 2] = 5.0
    scores[:, 3] = 4.9
    draw = lambda seed: TopKSampler(1.0, 2, torch.Generator().manual_seed(seed), [7])(None, scores)  # noqa: E731
    out = draw(0)
    chosen = out.argmax(-1)
    assert torch.all((chosen == 2) | (chosen == 3))
    assert torch.isinf(out).sum() == 3 * 9 and (out == 0).sum() == 3
    assert torch.equal(draw(0), out)
    greedy = TopKSampler(0.0, 2, None, [7])(None, scores)
    assert torch.all(greedy.argmax(-1) == 2)


def test_sampler_top_p_keeps_the_nucleus_only():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps the first two (the third starts at 0.8)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    scores = probs.log().repeat(4000, 1)
    for top_k in (0, 3):  # full-vocabulary sort, and within the top-k
        out = TopKSampler(1.0, top_k, torch.Generator().manual_seed(1), [], top_p=0.8)(None, scores)
        counts = torch.bincount(out.argmax(-1), minlength=4)
        assert counts[0] == 0 and counts[2] == 0
        assert abs(counts[1] / 4000 - 0.5 / 0.8) < 0.03  # renormalised over the nucleus: 0.625 / 0.375
    top1 = TopKSampler(1.0, 0, torch.Generator().manual_seed(0), [], top_p=0.3)(None, scores)
    assert torch.all(top1.argmax(-1) == 1)  # the most likely token alone already reaches 0.3
    full = TopKSampler(1.0, 0, torch.Generator().manual_seed(2), [], top_p=1.0)(None, scores)
    assert (torch.bincount(full.argmax(-1), minlength=4) > 0).all()  # top_p 1: every token can come
    with pytest.raises(ValueError, match="top_p"):
        TopKSampler(1.0, 0, None, [], top_p=0.0)


def test_cut_responses_keeps_tokens_through_first_eos():
    eos, pad = 9, 0
    gen = torch.tensor([[5, 6, 9, 4, 4], [5, 9, 9, 9, 9], [1, 2, 3, 4, 5]])
    responses, mask = cut_responses(gen, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert responses.tolist() == [[5, 6, 9, 0, 0], [5, 9, 0, 0, 0], [1, 2, 3, 4, 5]]


def test_summary_row_reads_vlcal_eval_report(tmp_path):
    from vlcal_verl.demo.evaluate import format_table, summary_row
    from vlcal_verl.evaluation.report import write_report

    def rec(conf, correct, blank=False):
        parsed = conf is not None
        return {
            "benchmark": "easy_vqa",
            "confidence": conf,
            "correct": correct,
            "parse_ok": parsed,
            "vision_confidence": conf,
            "reasoning_confidence": conf,
            "unanswerable": blank,
        }

    records = [
        rec(0.8, True),
        rec(0.4, False),
        rec(None, False),
        rec(0.6, True),
        rec(0.5, False, True),
        rec(0.3, False, True),
    ]
    row = summary_row(write_report(records, tmp_path, title="t"))
    assert row["accuracy"] == pytest.approx(0.5)  # 2 of 4 answerable; unparsed counts as wrong
    assert row["parse_rate"] == pytest.approx(0.75)
    assert row["unanswerable_gap"] == pytest.approx((0.8 + 0.4 + 0.0 + 0.6) / 4 - 0.4)  # unparsed Φ = 0
    assert 0.0 <= row["ece"] <= 1.0
    table = format_table({"before": row, "after": row})
    assert "| parse rate | 0.750 | 0.750 |" in table and table.count("\n") == 9


def test_demo_block_is_typed_and_names_bad_fields():
    cfg = DemoConfig.from_dict({"warm_start_lr": "1e-2", "eval_size": "12"})
    assert cfg.warm_start_lr == pytest.approx(0.01) and cfg.eval_size == 12
    with pytest.raises(ValueError, match=r"unknown key\(s\) in demo: \['warm_steps'\]"):
        DemoConfig.from_dict({"warm_steps": 3})
    with pytest.raises(ValueError, match=r"demo\.train_size must be > 0"):
        DemoConfig.from_dict({"train_size": 0})
    with pytest.raises(ValueError, match=r"demo\.seed must be of type int"):
        DemoConfig.from_dict({"seed": "zero"})


def test_tiny_cpu_recipe_composes_with_demo_paths(tmp_path):
    from omegaconf import OmegaConf

    from vlcal_verl.commands.train import DEFAULT_RECIPE
    from vlcal_verl.main import compose_recipe

    cfg = compose_recipe(DEFAULT_RECIPE, [f"demo.dir={tmp_path}", "trainer.total_training_steps=2"])
    assert cfg.trainer.device == "cpu" and cfg.actor_rollout_ref.rollout.name == "hf"
    assert cfg.actor_rollout_ref.model.path == f"{tmp_path}/warm_start"
    assert cfg.data.train_files == f"{tmp_path}/data/train.parquet"
    assert cfg.trainer.default_local_dir == f"{tmp_path}/verl" and cfg.trainer.total_training_steps == 2
    assert "hf_model" in cfg.actor_rollout_ref.actor.checkpoint.save_contents
    DemoConfig.from_dict(OmegaConf.to_container(cfg.demo, resolve=True))


def test_warm_start_prompt_is_the_prompt_verl_builds(tmp_path):
    """The warm start teaches the template on the exact token ids verl's dataset feeds the rollout."""

    from vlcal_verl.data.easy_vqa import load_easy_vqa, to_verl_rows
    from vlcal_verl.data.schema import write_parquet
    from vlcal_verl.demo.data import user_message
    from vlcal_verl.evaluation.hf_generate import encode_prompts
    from vlcal_verl.testing.tiny_models import load_tiny_vlm
    from vlcal_verl.testing.verl_loop import rl_dataset

    _, processor = load_tiny_vlm("qwen3-vl")
    items = load_easy_vqa("train", limit=2, seed=3)
    write_parquet(to_verl_rows(items), tmp_path / "t.parquet")
    ds = rl_dataset(tmp_path / "t.parquet", processor)
    for i, it in enumerate(items):
        messages = ds[i]["raw_prompt"]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ours = encode_prompts(processor, [user_message(it.question)], [it.image])
        theirs = processor(text=[text], images=[it.image], return_tensors="pt")
        assert (
            ours["input_ids"][0][ours["attention_mask"][0].bool()].tolist() == theirs["input_ids"][0].tolist()
        )


def test_read_verl_metrics_merges_launches(tmp_path):
    import json

    from vlcal_verl.demo.evaluate import plot_curves, read_verl_metrics

    a, b = tmp_path / "verl-1.jsonl", tmp_path / "verl-2.jsonl"
    a.write_text("\n".join(json.dumps({"step": s, "data": {"critic/score/mean": s}}) for s in (1, 2, 3)))
    b.write_text(json.dumps({"step": 3, "data": {"critic/score/mean": 30.0}}) + "\n")
    hist = read_verl_metrics([a, b, tmp_path / "missing.jsonl"])
    assert [h["step"] for h in hist] == [1, 2, 3] and hist[-1]["critic/score/mean"] == 30.0
    plot_curves(hist, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_nucleus_from_candidates_equals_the_full_sort(top_p):
    """The candidate path keeps exactly the tokens a full-vocabulary sort keeps, with the same probabilities."""
    from vlcal_verl.evaluation.hf_generate import nucleus_candidates

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=gen) * torch.tensor([0.5, 1, 2, 4, 8, 16])[:, None]
    top, idx = nucleus_candidates(logits, top_p, k=16)
    full = torch.softmax(logits, -1)
    for row in range(logits.shape[0]):
        p_sorted, order = full[row].sort(descending=True)
        keep = int(((p_sorted.cumsum(0) - p_sorted) < top_p).sum())  # brute-force nucleus size
        assert idx.shape[1] >= keep
        assert set(idx[row, :keep].tolist()) == set(order[:keep].tolist())
        assert torch.allclose((top[row, :keep] - logits[row].logsumexp(0)).exp(), p_sorted[:keep])
