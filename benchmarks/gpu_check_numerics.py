"""Part 2 of ``benchmarks/gpu_check.py``: the fused pass against a float64 brute force, and the exact
estimator's chunking at the real vocabulary (what is compared, and the tolerances and why: that module's
docstring)."""

from __future__ import annotations

FLOOR, NAIVE_FACTOR, CHUNK_ATOL = 1e-4, 3.0, 1e-4


def span_values(rows, spans, whole: bool):
    """Per sample, the float64 values on its vision span (or the whole response)."""
    out = []
    for row, (s, e) in zip(rows, spans.tolist(), strict=True):
        row = row.detach().double().cpu()
        out.append(row if whole else row[s:e])
    return out


def response_part(nested, data):
    """verl's packed-layout outputs cover each whole sequence (response token j's value at P + j − 1):
    the response's rows."""
    out = []
    for row, p, r in zip(nested.unbind(), data["prompts"].unbind(), data["responses"].unbind(), strict=True):
        if len(row) != len(p) + len(r):
            raise ValueError(f"verl output of {len(row)} tokens for a sequence of {len(p)} + {len(r)}")
        out.append(row[len(p) - 1 : len(p) + len(r) - 1])
    return out


def compare(name: str, got, ref, naive, out_dtype) -> dict:
    """RMS error of ``got`` and of the naive path against the float64 reference (concatenated tokens).
    Tolerance: 3× the naive error + 1e-4 + 2 units of ``got``'s own dtype at the reference's RMS (verl's
    pure-PyTorch log-softmax and entropy return the logits' dtype, bf16: ~0.1 at |log p| ≈ 12)."""
    import torch

    g, r, n = (torch.cat(x) for x in (got, ref, naive))
    if g.shape != r.shape:
        return {"field": name, "ok": False, "error": f"shape {tuple(g.shape)} != reference {tuple(r.shape)}"}
    rms = lambda x: float((x - r).pow(2).mean().sqrt())  # noqa: E731
    err, err_naive = rms(g), rms(n)
    tol = NAIVE_FACTOR * err_naive + FLOOR + 2 * torch.finfo(out_dtype).eps * float(r.pow(2).mean().sqrt())
    ok = bool(torch.isfinite(g).all()) and err <= tol
    rel = float((g - r).norm() / r.norm().clamp_min(1e-300))
    return dict(field=name, dtype=str(out_dtype), tokens=int(r.numel()), rms=err, naive_rms=err_naive, tol=tol,
                rel_l2=rel, max_abs=float((g - r).abs().max()), ref_mean=float(r.mean()), ok=ok)  # fmt: skip


def reference(model, ctx, cfg):
    """Per sample, float64 (H, KL, log p_masked(y), log p_orig(y)) at every response token from two
    full-sequence forwards of ``model`` (original, masked image), logits upcast to float64."""
    import torch
    import vce_cost

    from vlcal_verl.vce_mask import batch_cell_masks, mask_pixel_values

    d = ctx.data
    out = {k: [] for k in ("H", "KL", "lpm", "lpo")}
    rows = zip(d["input_ids"].unbind(), d["position_ids"].unbind(), d["prompts"].unbind(),
               d["responses"].unbind(), list(d["multi_modal_inputs"]), ctx.mask_ids, strict=True)  # fmt: skip
    for ids, pos, prompt, resp, mm, mid in rows:
        mm = getattr(mm, "data", mm)
        grid, pv = mm["image_grid_thw"], mm["pixel_values"]
        masks = batch_cell_masks(grid, [1], [mid], cfg.mask_prob, cfg.seed, 2)
        masked = mask_pixel_values(pv, grid, masks, 2, vce_cost.black())
        p, n = len(prompt), len(resp)
        dev = next(model.parameters()).device
        keep = torch.arange(p - 1, p + n - 1, device=dev)  # the logit at P + t − 1 predicts token t
        kw = dict(input_ids=ids[None].to(dev), position_ids=pos[:, None].to(dev), image_grid_thw=grid.to(dev),
                  logits_to_keep=keep, use_cache=False)  # fmt: skip
        with torch.no_grad():
            lo = model(**kw, pixel_values=pv.to(dev)).logits[0]
            lm = model(**kw, pixel_values=masked.to(dev)).logits[0]
        y = resp.to(dev).long()
        for s in range(0, n, 256):  # float64 over [256 × vocab] at a time
            o, m = lo[s : s + 256].double().log_softmax(-1), lm[s : s + 256].double().log_softmax(-1)
            po, ys = o.exp(), y[s : s + 256, None]
            out["H"].append(-(po * o).sum(-1).cpu())
            out["KL"].append((po * (o - m)).sum(-1).cpu())
            out["lpm"].append(m.gather(-1, ys)[:, 0].cpu())
            out["lpo"].append(o.gather(-1, ys)[:, 0].cpu())
    lens = [len(r) for r in d["responses"].unbind()]
    return {k: list(torch.cat(v).split(lens)) for k, v in out.items()}


def fused_outputs(ctx, chunk: int | None = None, authors: bool = False):
    import vce_cost

    from vlcal_verl.config import VCEConfig

    chunk = chunk or ctx.args.chunk
    cfg = (
        VCEConfig(scope="full", estimator="reference", entropy="nll", vocab_chunk_tokens=chunk)
        if authors
        else VCEConfig(scope="truncated", estimator="exact", vocab_chunk_tokens=chunk)
    )
    return cfg, vce_cost.fused_call(
        ctx.engine, ctx.data, ctx.spans, ctx.mask_ids, cfg, ctx.max_tokens, ctx.device
    )


def part_numerics(ctx) -> dict:
    """Fused pass vs float64 brute force (tolerance: module docstring), then the chunking check."""
    import copy

    import torch

    cfg, exact = fused_outputs(ctx)
    _, authors = fused_outputs(ctx, authors=True)
    ctx.exact, ctx.authors = exact, authors
    naive = reference(ctx.model, ctx, cfg)
    model64 = copy.deepcopy(ctx.model).to(torch.float64)
    ref = reference(model64, ctx, cfg)
    del model64
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    spans = ctx.spans
    vce = lambda out, key: out[key].unbind()  # noqa: E731
    verl = lambda key: response_part(exact[key], ctx.data)  # noqa: E731
    checks = [  # (name, per-sample values, reference key, on the vision span only)
        ("KL_t (fused exact, span)", vce(exact, "vce_kl"), "KL", True),
        ("H_t (fused exact, span)", vce(exact, "vce_entropy"), "H", True),
        ("log p_masked (fused exact, span)", vce(exact, "vce_masked_logp"), "lpm", True),
        ("log p_masked (fused authors', response)", vce(authors, "vce_masked_logp"), "lpm", False),
        ("verl log_probs (fused call, response)", verl("log_probs"), "lpo", False),
        ("verl entropy (fused call, response)", verl("entropy"), "H", False),
    ]
    fields = [
        compare(name, span_values(got, spans, not span), span_values(ref[k], spans, not span),
                span_values(naive[k], spans, not span), got[0].dtype)
        for name, got, k, span in checks
    ]  # fmt: skip
    chunks = chunk_check(ctx)
    ok = all(f["ok"] for f in fields) and all(c["ok"] for c in chunks)
    return {"fields": fields, "chunks": chunks, "ok": ok}


def chunk_check(ctx) -> list[dict]:
    """The exact estimator at ``--chunk``, again (run-to-run spread), at 100 and in one chunk: the VCE
    fields must agree within CHUNK_ATOL + 2× the spread; time and peak memory of each call."""
    import torch
    import vce_cost

    resident = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else 0.0
    runs = []
    for label, chunk in [
        ("base", ctx.args.chunk),
        ("repeat", ctx.args.chunk),
        ("100", 100),
        ("one", 1 << 20),
    ]:
        box: dict = {}
        secs, mem = vce_cost.measure_one(
            lambda c=chunk, b=box: b.update(out=fused_outputs(ctx, c)[1]), ctx.device
        )
        runs.append((label, chunk, box["out"], secs, mem - resident))
    base = runs[0][2]
    keys = ("vce_kl", "vce_entropy", "vce_masked_logp")

    def diff(out):
        return max(
            float((a - b).abs().max())
            for k in keys
            for a, b in zip(out[k].unbind(), base[k].unbind(), strict=True)
        )

    spread = diff(runs[1][2])
    out = []
    for label, chunk, res, secs, mem in runs:
        d = diff(res)
        tol = CHUNK_ATOL + 2 * spread
        out.append(dict(run=label, chunk=chunk, max_abs_diff=d, tol=tol, seconds=secs, peak_above_resident=mem,
                        ok=label in ("base", "repeat") or d <= tol))  # fmt: skip
    return out
