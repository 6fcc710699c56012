"""The fast nucleus sampler ("cdf") against brute force and against the earlier sorted path, and the
benchmark script that compares their speed (benchmarks/bench_eval_speed.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlcal_verl.evaluation.hf_generate import TopKSampler, inverse_cdf, sample_nucleus

ROOT = Path(__file__).resolve().parents[2]
DRAWS = 40_000


def brute_force_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus probabilities of one row by a full sort: keep a token while the more likely ones hold < top_p."""
    p = torch.softmax(logits.double(), -1)
    p_sorted, order = p.sort(descending=True)
    keep = (p_sorted.cumsum(0) - p_sorted) < top_p
    out = torch.zeros_like(p)
    out[order[keep]] = p_sorted[keep]
    return out / out.sum()


def assert_frequencies(drawn: torch.Tensor, expected: torch.Tensor) -> None:
    """Empirical frequencies within 5 binomial standard errors (+ 1e-3) of ``expected``; zeros never drawn."""
    freq = torch.bincount(drawn, minlength=len(expected)).double() / len(drawn)
    sigma = (expected * (1 - expected) / len(drawn)).sqrt()
    assert torch.all(freq[expected == 0] == 0)
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-3), (freq - expected).abs().max()


ROWS = {
    "peaked": torch.tensor([4.0, 3.0, 2.5, 1.0, 0.0, -1.0] + [-3.0] * 44),
    "flat": torch.linspace(0.0, 0.5, 50),
    "one-hot-ish": torch.tensor([12.0] + [0.0] * 49),
}


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
def test_sample_nucleus_draws_the_brute_force_nucleus_distribution(name, top_p):
    logits = ROWS[name]
    gen = torch.Generator().manual_seed(0)
    drawn = sample_nucleus(logits.repeat(DRAWS, 1), top_p, gen)[:, 0]
    assert_frequencies(drawn, brute_force_nucleus(logits, top_p))


def test_sample_nucleus_fallback_after_rejections_is_the_same_distribution():
    """rounds=0 sends every row to the sorted fallback; rounds=1 mixes both: same nucleus either way."""
    logits = ROWS["flat"]
    for rounds in (0, 1):
        gen = torch.Generator().manual_seed(rounds)
        drawn = sample_nucleus(logits.repeat(DRAWS, 1), 0.3, gen, rounds=rounds)[:, 0]
        assert_frequencies(drawn, brute_force_nucleus(logits, 0.3))


def test_inverse_cdf_across_uneven_blocks_never_draws_a_zero():
    """Blocks of 7 over 50 tokens (a partial last block), suppressed tokens at a block's edges."""
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(3)), -1)
    probs[[0, 6, 7, 48, 49]] = 0.0
    frac = torch.rand(DRAWS, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    drawn = inverse_cdf(probs.repeat(DRAWS, 1), frac, block=7)[:, 0]
    assert_frequencies(drawn, (probs / probs.sum()).double())
    edges = torch.tensor([[0.0], [1.0 - 2**-53]], dtype=torch.float64)  # the smallest and largest uniforms
    assert inverse_cdf(probs.repeat(2, 1), edges, block=7)[:, 0].tolist() == [1, 47]


def test_sampler_methods_keep_suppression_seed_and_top_k_path():
    scores = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    scores[:, 5] = 50.0  # suppressed: never drawn despite being the likeliest

    def draw(seed: int, method: str) -> torch.Tensor:
        return TopKSampler(0.7, 0, torch.Generator().manual_seed(seed), [5], 0.95, method)(None, scores)

    for method in ("cdf", "sorted"):
        assert not (draw(0, method).argmax(-1) == 5).any()
        assert torch.equal(draw(0, method), draw(0, method))  # seeded: reproducible
    # with a top-k cut both methods run the same code: identical draws for one seed
    same = [TopKSampler(0.7, 20, torch.Generator().manual_seed(1), [5], 0.9, m)(None, scores) for m in ("cdf", "sorted")]  # fmt: skip
    assert torch.equal(same[0], same[1])
    with pytest.raises(ValueError, match="sampler method"):
        TopKSampler(0.7, 0, None, [], method="fast")


def _tiny_eval(temperature: float, method: str, seed: int = 0, threads: int | None = None):
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.evaluation.generate import GenerationSettings, generate_hf, load_hf_model

    model, processor = load_hf_model("tiny:qwen3-vl")
    items = load_easy_vqa("test", limit=3, seed=0) + load_easy_vqa("test", limit=2, seed=0, unanswerable=True)
    settings = GenerationSettings(
        max_new_tokens=12, temperature=temperature, batch_size=3, seed=seed, sampler=method, threads=threads
    )
    return generate_hf(model, processor, items, settings)


def test_greedy_eval_is_token_identical_between_the_fast_and_sorted_paths():
    """The earlier path as it ran (sorted sampler, torch's default threads) against today's (auto: 1)."""
    fast, old = _tiny_eval(0.0, "cdf"), _tiny_eval(0.0, "sorted", threads=torch.get_num_threads())
    assert [g.token_ids for g in fast] == [g.token_ids for g in old]
    assert [g.text for g in fast] == [g.text for g in old]
    assert all(len(g.token_ids) == 12 for g in fast)  # a random model never ends its turn


def test_sampled_eval_is_reproducible_per_seed_and_seed_dependent():
    a, b, c = _tiny_eval(0.6, "cdf", seed=0), _tiny_eval(0.6, "cdf", seed=0), _tiny_eval(0.6, "cdf", seed=1)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_benchmark_script_prints_both_paths_with_consistent_ratios():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_eval_speed.py"), "--limit", "2", "--batch-size", "2",
         "--max-new-tokens", "3", "--rounds", "1", "--configs", "sorted:1,cdf:auto"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in out.stdout.splitlines() if ln.startswith("| ") and "---" not in ln]
    header, body = [h.strip() for h in rows[0]], {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}
    assert header[:4] == ["sampler", "threads", "median s", "items/s (median)"]
    assert list(body) == ["sorted (baseline)", "cdf"]
    assert body["sorted (baseline)"][0] == "1" and body["cdf"][0] == "auto (1)"  # tiny model: 1 thread
    base = float(body["sorted (baseline)"][1])
    for row in body.values():
        secs, rate, ratio = float(row[1]), float(row[2]), float(row[4])
        assert secs > 0
        # one round, so median = best; recomputed from the printed seconds (rounded to 0.01 s), 4 items
        assert 4 / (secs + 0.005) - 0.005 <= rate <= 4 / max(secs - 0.005, 1e-9) + 0.005
        assert float(row[3]) == rate
        assert (
            (base - 0.005) / (secs + 0.005) - 0.005
            <= ratio
            <= (base + 0.005) / max(secs - 0.005, 1e-9) + 0.005
        )
    assert float(body["sorted (baseline)"][4]) == 1.0
    for row in body.values():  # process CPU seconds, and items per CPU second recomputed from them
        cpu, per_cpu = float(row[5]), float(row[6])
        assert cpu > 0 and 4 / (cpu + 0.005) - 0.005 <= per_cpu <= 4 / max(cpu - 0.005, 1e-9) + 0.005


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--limit", "0"), ("--configs", "fast:1"), ("--configs", "cdf:0"), ("--configs", "cdf:x")],
)
def test_benchmark_script_refuses_bad_arguments_in_one_line(flag, value):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_eval_speed.py"), flag, value],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and flag in out.stderr.splitlines()[-1]


def test_generation_threads_one_for_a_tiny_model_and_restored_after():
    from vlcal_verl.data.easy_vqa import load_easy_vqa
    from vlcal_verl.evaluation.generate import (
        GenerationSettings,
        generate_hf,
        generation_threads,
        load_hf_model,
    )

    model, processor = load_hf_model("tiny:qwen3-vl")
    assert sum(p.numel() for p in model.parameters()) < 100_000_000 and generation_threads(model) == 1
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        settings = GenerationSettings(max_new_tokens=2, temperature=0.0, batch_size=1)
        generate_hf(model, processor, load_easy_vqa("test", limit=1, seed=0), settings)
        assert set(seen) == {1} and torch.get_num_threads() == before
        seen.clear()
        generate_hf(model, processor, load_easy_vqa("test", limit=1, seed=0), GenerationSettings(
            max_new_tokens=2, temperature=0.0, batch_size=1, threads=2))  # fmt: skip
        assert set(seen) == {2} and torch.get_num_threads() == before
    finally:
        hook.remove()
