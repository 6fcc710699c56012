"""``/v1/visual-labels``: the batch visual label S̃_vis from per-sample VCE statistics.

A trainer that runs its own masked-image forward (docs/design.md §4) sends, per rollout, either K̄ and H̄
over the vision span or the per-token KL_t and H_t arrays (plus the span); the server returns
S = log(K̄ + ε) − log(H̄ + ε) and S̃_vis = sigmoid of the batch z-score of S over the samples with a span.
S̃ is a property of the *batch*, so one request must carry the whole (global) rollout batch.

The arithmetic is VCE's own (:func:`vlcal_verl.vce.visual_certainty` and
:func:`vlcal_verl.vce.normalize_visual_certainty`): K̄/H̄ inputs are laid out as one-token spans, so
both input forms go through the same code path as training. torch is imported by :func:`warm_up`
during the server's start-up (after the grading pool's forkserver is running, before ``/readyz`` says
ready): importing it on the first request made that request take seconds.
"""

from __future__ import annotations

from reward_server import schemas


def _pack(samples: list[schemas.VisualSample]):
    """KL_t, H_t and span mask as float64/bool tensors [batch, max_len] (zeros outside the span)."""
    import torch

    lengths = [len(s.kl) if s.kl is not None else 1 for s in samples]
    width = max([1, *lengths])
    kl = torch.zeros(len(samples), width, dtype=torch.float64)
    entropy = torch.zeros_like(kl)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, s in enumerate(samples):
        if s.kl_mean is not None:
            kl[i, 0], entropy[i, 0], mask[i, 0] = s.kl_mean, s.entropy_mean, True
        elif s.kl is not None and s.entropy is not None:
            n = len(s.kl)
            kl[i, :n] = torch.tensor(s.kl, dtype=torch.float64)
            entropy[i, :n] = torch.tensor(s.entropy, dtype=torch.float64)
            start, end = s.span if s.span is not None else (0, n)
            mask[i, start:end] = True
    return kl, entropy, mask


def _finite_or_none(x: float) -> float | None:
    return None if x != x else float(x)  # NaN marks "no vision span"


def visual_labels(request: schemas.VisualLabelRequest) -> schemas.VisualLabelResponse:
    """K̄, H̄, S and S̃_vis per sample (None where the sample has no span); CPU, synchronous."""
    from vlcal_verl import rewards, vce
    from vlcal_verl.config import VCEConfig

    samples = request.samples
    if not samples:
        return schemas.VisualLabelResponse(labels=[], n_with_span=0)
    kl, entropy, mask = _pack(samples)
    cfg = VCEConfig(signal=request.signal, eps=request.eps)
    k_bar, h_bar, s = vce.visual_certainty(kl, entropy, mask, cfg)
    s_tilde = vce.normalize_visual_certainty(s)
    labels = []
    for i, sample in enumerate(samples):
        st = _finite_or_none(float(s_tilde[i]))
        reward = None
        if sample.vision_confidence is not None:
            reward = rewards.visual_reward(sample.vision_confidence, st)
        labels.append(
            schemas.VisualLabel(
                uid=sample.uid,
                kl_mean=_finite_or_none(float(k_bar[i])),
                entropy_mean=_finite_or_none(float(h_bar[i])),
                s=_finite_or_none(float(s[i])),
                s_tilde=st,
                visual_reward=reward,
            )
        )
    return schemas.VisualLabelResponse(
        labels=labels, n_with_span=sum(lb.s_tilde is not None for lb in labels)
    )


def warm_up() -> None:
    """Import torch and run the label arithmetic once on two samples; raise if the result is wrong."""
    request = schemas.VisualLabelRequest(
        samples=[
            schemas.VisualSample(uid="a", kl_mean=1.0, entropy_mean=1.0),
            schemas.VisualSample(uid="b", kl=[0.5, 2.0], entropy=[1.0, 1.0], span=(0, 2)),
        ]
    )
    labels = visual_labels(request).labels
    # S_a = 0 < S_b = log 1.25, so the batch z-scores are ∓1 and S̃ = sigmoid(∓1)
    if not (labels[0].s_tilde is not None and labels[1].s_tilde is not None):
        raise RuntimeError(f"visual-labels warm-up gave no S̃: {labels}")
    if not labels[0].s_tilde < 0.5 < labels[1].s_tilde:
        raise RuntimeError(f"visual-labels warm-up gave S̃ out of order: {labels}")
