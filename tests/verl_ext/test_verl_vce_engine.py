"""compute_vce's masked pass through verl 0.9.1's own engine code, on CPU with a tiny Qwen3-VL.

verl's ``FSDPEngine.infer_batch`` → ``forward_backward_batch`` (dynamic-batch micro-batching, re-ordering)
→ ``prepare_model_inputs`` run unmodified; only FSDP wrapping and CUDA are absent (the engine object is
built without ``__init__``, a 1-rank gloo group stands in for the DP group). KL_t / H_t are checked
against a brute-force full-logits computation in float64, and 'truncated' against 'full' (causality).
"""

from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from tensordict import NonTensorStack, TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp import transformer_impl

from vlcal_verl.config import VCEConfig
from vlcal_verl.vce_mask import batch_cell_masks, black_row_for, mask_pixel_values
from vlcal_verl.verl_ext.vce_engine import (
    prepare_vce_batch,
    target_rows,
    vce_forward_installed,
    vce_lengths,
)
from vlcal_verl.verl_ext.worker import VLCalActorRolloutRefWorker, mask_ids_of, registered_methods

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESPONSES = [
    "<think><vision> a red circle </vision><reasoning> red </reasoning></think> \\boxed{red}",
    "<think><vision> two blue squares on the left side </vision></think> \\boxed{2}",
    "no protocol at all \\boxed{3}",
]


def test_vce_lengths_hand_computed():
    p, r = torch.tensor([10, 10, 10]), torch.tensor([8, 8, 8])
    spans = torch.tensor([[2, 5], [-1, -1], [0, 20]])
    lens, t0, t1 = vce_lengths(p, r, spans, "truncated")
    assert lens.tolist() == [14, 10, 17] and t0.tolist() == [2, 0, 0] and t1.tolist() == [5, 0, 8]
    lens, t0, t1 = vce_lengths(p, r, spans, "full")  # every response, span or not (perception filter)
    assert lens.tolist() == [18, 18, 18] and t0.tolist() == [0, 0, 0] and t1.tolist() == [8, 8, 8]


def test_target_rows_both_layouts():
    mb = TensorDict(
        {
            "vce_t_start": torch.tensor([2, 0]),
            "vce_t_end": torch.tensor([4, 1]),
            "vce_prompt_len": torch.tensor([5, 3]),
            "input_ids": torch.nested.as_nested_tensor([torch.zeros(8), torch.zeros(3)], layout=torch.jagged),
        },
        batch_size=2,
    )
    b, t, col = target_rows(mb, remove_padding=False)
    assert b.tolist() == [0, 0, 1] and t.tolist() == [2, 3, 0] and col.tolist() == [6, 7, 2]
    _, _, packed = target_rows(mb, remove_padding=True)
    assert packed.tolist() == [6, 7, 8 + 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlcal_verl.testing.tiny_models import load_tiny_vlm

    cache = os.environ.get("VLCAL_CACHE") or str(tmp_path_factory.mktemp("vlcal_cache"))
    return load_tiny_vlm("qwen3-vl", cache_dir=os.path.join(cache, "tiny"))


def _verl_batch(model, proc):
    """A verl-shaped per-sample batch (what TransferQueue hands the actor worker)."""
    from vlcal_verl.verl_ext.check import tiny_verl_batch

    data, rows, spans, _ = tiny_verl_batch(model, proc, RESPONSES)
    data.set("uid", NonTensorStack(*["u0", "u0", "u1"]))
    data.set("session_id", NonTensorStack(*[0, 1, 0]))
    return data, rows, spans


def _engine(model):
    from vlcal_verl.verl_ext.check import bare_engine

    return bare_engine(model)


@pytest.fixture(scope="module")
def gloo():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _run(model, proc, data, spans, cfg, monkeypatch):
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    prepared = prepare_vce_batch(data, spans, cfg, black_row_for(proc), 2, mask_ids_of(data))
    # two micro-batches under dynamic batching: verl must re-order the per-sample outputs
    tu.assign_non_tensor(
        prepared,
        use_remove_padding=False,
        use_dynamic_bsz=True,
        temperature=1.0,
        max_token_len_per_gpu=int(prepared["input_ids"].offsets().diff().max()) + 1,
    )
    eng = _engine(model)
    with vce_forward_installed(eng, cfg, device="cpu"):
        out = eng.infer_batch(prepared, loss_function=None)["model_output"]
    assert "forward_step" not in vars(eng)  # the swap is undone
    return out


def _brute_force(model, proc, rows, spans, cfg, whole_response=False):
    """KL(p_o ‖ p_m), H(p_o) and log p_m(y_t) in float64 from full logits, at every span token (or, with
    ``whole_response``, every response token of every sample)."""
    black = black_row_for(proc)
    exp_kl, exp_h, exp_lpm = [], [], []
    for i, (r, (s, e)) in enumerate(zip(rows, spans.tolist(), strict=True)):
        n = len(r["responses"])
        kl_row, h_row, lpm_row = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        if whole_response:
            s, e = 0, n
        if s >= 0:
            mm = r["mm"]
            masks = batch_cell_masks(
                mm["image_grid_thw"], [1], [mask_ids_of_row(i)], cfg.mask_prob, cfg.seed, 2
            )
            masked = mask_pixel_values(mm["pixel_values"], mm["image_grid_thw"], masks, 2, black)
            kw = {
                "input_ids": r["input_ids"][None],
                "position_ids": r["position_ids"][:, None],
                "image_grid_thw": mm["image_grid_thw"],
            }
            with torch.no_grad():
                lo = model(**kw, pixel_values=mm["pixel_values"]).logits[0].double()
                lm = model(**kw, pixel_values=masked).logits[0].double()
            p = len(r["prompts"])
            for t in range(s, e):
                lpo, lpm = lo[p + t - 1].log_softmax(-1), lm[p + t - 1].log_softmax(-1)
                kl_row[t] = float((lpo.exp() * (lpo - lpm)).sum())
                h_row[t] = float(-(lpo.exp() * lpo).sum())
                lpm_row[t] = float(lpm[r["responses"][t]])
        exp_kl.append(kl_row)
        exp_h.append(h_row)
        exp_lpm.append(lpm_row)
    return exp_kl, exp_h, exp_lpm


def mask_ids_of_row(i):
    return ["u0_0", "u0_1", "u1_0"][i]


def test_masked_pass_through_verl_engine_matches_brute_force(tiny, gloo, monkeypatch):
    model, proc = tiny
    data, rows, spans = _verl_batch(model, proc)
    assert spans[0, 0] >= 0 and spans[1, 0] >= 0 and spans[2, 0] == -1
    cfg = VCEConfig(scope="truncated", vocab_chunk_tokens=2)
    out = _run(model, proc, data, spans, cfg, monkeypatch)
    exp_kl, exp_h, exp_lpm = _brute_force(model, proc, rows, spans, cfg)
    for i, (kl, h) in enumerate(zip(out["vce_kl"].unbind(), out["vce_entropy"].unbind(), strict=True)):
        assert kl.shape == exp_kl[i].shape
        torch.testing.assert_close(kl, exp_kl[i], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(h, exp_h[i], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(out["vce_masked_logp"].unbind()[i], exp_lpm[i], atol=2e-4, rtol=1e-3)
    assert float(out["vce_kl"].unbind()[0].sum()) > 0  # the mask changes the prediction

    full = _run(model, proc, data, spans, VCEConfig(scope="full"), monkeypatch)
    for i, (s, e) in enumerate(spans.tolist()):
        if s >= 0:  # causal LM: the span's KL_t is the same whether the forward stops at its end or not
            torch.testing.assert_close(
                full["vce_kl"].unbind()[i][s:e], out["vce_kl"].unbind()[i][s:e], atol=1e-5, rtol=1e-4
            )
    assert float(full["vce_kl"].unbind()[0][spans[0, 1] :].abs().sum()) > 0  # 'full' also fills the tail


def test_sampled_estimators_run_only_the_masked_forward(tiny, gloo, monkeypatch):
    """The authors' variant: no original forward; log p_masked(y_t) of every response token of every
    sample (the one without a span too) equals the brute-force masked log-softmax."""
    model, proc = tiny
    data, rows, spans = _verl_batch(model, proc)
    cfg = VCEConfig(scope="full", estimator="reference", entropy="nll", vocab_chunk_tokens=3)
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = _run(model, proc, data, spans, cfg, monkeypatch)
        n_sampled = len(calls)
        _run(model, proc, data, spans, VCEConfig(scope="full"), monkeypatch)
    finally:
        hook.remove()
    assert "vce_kl" not in out and "vce_entropy" not in out
    assert (
        len(calls) - n_sampled == 2 * n_sampled
    )  # exact: original + masked per micro-batch; here masked only
    _, _, exp_lpm = _brute_force(model, proc, rows, spans, cfg, whole_response=True)
    for got, want in zip(out["vce_masked_logp"].unbind(), exp_lpm, strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
        assert bool((got < 0).all())


def test_compute_vce_method_is_registered_like_compute_log_prob():
    from verl.single_controller.base.decorator import MAGIC_ATTR
    from verl.workers.engine_workers import ActorRolloutRefWorker

    assert "compute_vce" in registered_methods()
    ours = getattr(VLCalActorRolloutRefWorker.compute_vce, MAGIC_ATTR)
    theirs = getattr(ActorRolloutRefWorker.compute_log_prob, MAGIC_ATTR)
    assert ours["dispatch_mode"]["dispatch_fn"].func is theirs["dispatch_mode"]["dispatch_fn"].func
    assert ours["dispatch_mode"]["dispatch_fn"].args == ("actor",)
    assert (ours["execute_mode"], ours["blocking"]) == (theirs["execute_mode"], theirs["blocking"])


def test_compute_vce_worker_method_end_to_end(tiny, gloo, monkeypatch):
    """The worker method itself (verl's register/profiler wrappers included) with a CPU engine."""
    model, proc = tiny
    data, _, spans = _verl_batch(model, proc)
    data["vlcal_vision_span"] = spans
    tu.assign_non_tensor(
        data,
        vlcal_vce={"scope": "truncated", "estimator": "exact"},
        temperature=1.0,
        use_remove_padding=False,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=3,
    )
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr("verl.utils.device.get_device_id", lambda: "cpu")
    eng = _engine(model)
    worker = object.__new__(VLCalActorRolloutRefWorker)
    worker._vce_constants = (black_row_for(proc), 2)
    worker._vce_model_config = SimpleNamespace(hf_config=model.config, processor=proc)  # as verl builds it
    worker.profiler = None  # verl's annotate runs the method directly without a profiler
    worker.actor = SimpleNamespace(
        engine=eng, infer_batch=lambda d: tu.get_tensordict(eng.infer_batch(d)["model_output"])
    )
    out = VLCalActorRolloutRefWorker.compute_vce(worker, data)
    kl = out["vce_kl"].unbind()
    s, e = spans[0].tolist()
    assert bool((kl[0][s:e] >= 0).all()) and float(kl[0][s:e].sum()) > 0
    assert float(kl[0][:s].abs().sum()) == 0 and float(kl[2].abs().sum()) == 0


@pytest.mark.parametrize(
    "cfg",
    [
        VCEConfig(
            scope="truncated", vocab_chunk_tokens=2
        ),  # exact: the original logits come from verl's pass
        VCEConfig(scope="full", estimator="reference", entropy="nll"),  # the authors': masked forward only
    ],
    ids=["exact-truncated", "authors-full"],
)
@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "packed"])
def test_fused_pass_equals_the_separate_call_and_keeps_verls_outputs(
    tiny, gloo, monkeypatch, cfg, remove_padding
):
    """One verl ``infer_batch`` (old log-probs + entropy) with VCE fused in: verl's fields are those of the
    plain pass, and KL_t / H_t / log p_masked equal the separate ``compute_vce`` path's to 1e-6 (fp32)."""
    from vlcal_verl.verl_ext.vce_fused import add_vce_targets, fused_forward_installed

    model, proc = tiny
    data, _, spans = _verl_batch(model, proc)
    separate = _run(model, proc, data, spans, cfg, monkeypatch)
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")  # verl's own step, on the CPU

    def verl_pass(batch, fused):
        batch = batch.clone(recurse=False)
        tu.assign_non_tensor(
            batch, use_remove_padding=remove_padding, use_dynamic_bsz=True, temperature=1.0,
            calculate_entropy=True, max_token_len_per_gpu=int(batch["input_ids"].offsets().diff().max()) + 1,
        )  # fmt: skip
        eng = _engine(model)
        if fused:
            add_vce_targets(batch, spans, cfg, mask_ids_of(batch))
        calls = []
        hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            ctx = (
                fused_forward_installed(eng, cfg, black_row_for(proc), 2, device="cpu")
                if fused
                else nullcontext()
            )
            with ctx:
                out = eng.infer_batch(batch, loss_function=None)["model_output"]
        finally:
            hook.remove()
        assert "forward_step" not in vars(eng)
        return out, len(calls)

    plain, n_plain = verl_pass(data, fused=False)
    fused, n_forwards = verl_pass(data, fused=True)
    assert n_forwards == 2 * n_plain  # per micro-batch: verl's forward + one masked forward, never a third
    for key in ("log_probs", "entropy"):
        for a, b in zip(fused[key].unbind(), plain[key].unbind(), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    keys = ["vce_masked_logp"] + (["vce_kl", "vce_entropy"] if cfg.estimator == "exact" else [])
    for key in keys:
        for a, b in zip(fused[key].unbind(), separate[key].unbind(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_mask_ids_by_tokens_follow_the_rollout_not_its_uid():
    """Under ``rollout.full_determinism`` a rollout's mask seed id is a digest of its tokens: the same
    tokens under fresh uids (a rerun) get the same id, different tokens a different one; by default the
    id is ``{uid}_{session_id}``."""
    rows = [torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 7, 9]), torch.tensor([5, 6, 7, 8])]

    def batch(uids):
        td = TensorDict({"input_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, batch_size=3)
        td.set("uid", NonTensorStack(*uids))
        td.set("session_id", NonTensorStack(*[0, 1, 2]))
        return td

    first, rerun = batch(["a", "a", "a"]), batch(["b", "b", "b"])
    assert mask_ids_of(first) == ["a_0", "a_1", "a_2"]
    ids = mask_ids_of(first, by_tokens=True)
    assert ids == mask_ids_of(rerun, by_tokens=True)
    assert ids[0] == ids[2] != ids[1]
    padded = TensorDict({"input_ids": torch.stack(rows)}, batch_size=3)
    assert mask_ids_of(padded, by_tokens=True) == ids
