"""Part 3 of ``benchmarks/gpu_check.py``: the perception filter inside verl's ``ppo_loss`` and TAR on device
tensors against the same calls on CPU tensors.

Inputs come from part 2's fused calls on the device: the perception mask ranks each response's tokens
by the clamped k3 KL of the authors' variant (verl's old log-probs against log p_masked), TAR reads the
exact variant's KL_t / H_t on the vision spans. The loss runs as verl's FSDP engine calls it: a
micro-batch laid out as verl lays it out (jagged per-sample fields, flat log-probs of the packed
sequence), the actor config with the trainer's loss settings (``vlcal_trainer.yaml``). Both sides compute
in float32 (TAR's weights in float64) with different reduction orders, so they must agree within
rtol 1e-5 / atol 1e-6; on a CPU rehearsal both sides are the CPU and the comparison only proves the
path runs.
"""

from __future__ import annotations

from pathlib import Path

RTOL, ATOL = 1e-5, 1e-6


def actor_config():
    """verl's FSDP actor config with the trainer's loss settings and the perception policy loss."""
    import yaml
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    root = Path(__file__).resolve().parents[1]
    trainer = yaml.safe_load((root / "vlcal_verl" / "hydra_conf" / "vlcal_trainer.yaml").read_text())
    actor = trainer["actor_rollout_ref"]["actor"]
    keys = (
        "clip_ratio_low",
        "clip_ratio_high",
        "clip_ratio_c",
        "use_kl_loss",
        "kl_loss_type",
        "kl_loss_coef",
    )
    return FSDPActorConfig(
        strategy="fsdp",
        rollout_n=8,
        use_dynamic_bsz=True,
        ppo_mini_batch_size=8,
        policy_loss=PolicyLossConfig(loss_mode="vlcal_perception"),
        **{k: actor[k] for k in keys},
    )


def loss_inputs(ctx):
    """(micro-batch, current log-probs flat over the packed sequence) on the CPU."""
    import torch
    from gpu_check_numerics import response_part
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    from vlcal_verl.token_signals import k3_clamped, perception_mask
    from vlcal_verl.verl_ext.perception import PERCEPTION_FIELD

    # 1-D rows, jagged as TransferQueue hands them over (their longest row known to to_padded_tensor)
    nested_rows = lambda rows: torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)  # noqa: E731

    g = torch.Generator().manual_seed(1)
    old = [x.float().cpu() for x in response_part(ctx.authors["log_probs"], ctx.data)]
    masked = [x.float().cpu() for x in ctx.authors["vce_masked_logp"].unbind()]
    prompts = [x.cpu() for x in ctx.data["prompts"].unbind()]
    lens = [len(o) for o in old]
    pad = lambda rows: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # noqa: E731
    resp_mask = pad([torch.ones(n) for n in lens])
    kept = perception_mask(pad([k3_clamped(o, m) for o, m in zip(old, masked, strict=True)]), resp_mask, 0.2)
    adv = [torch.full((n,), float(torch.randn(1, generator=g))) for n in lens]
    cur = [o + 0.05 * torch.randn(len(o), generator=g) for o in old]
    ref = [o + 0.05 * torch.randn(len(o), generator=g) for o in old]
    data = TensorDict(
        {
            "prompts": nested_rows(prompts),
            "responses": nested_rows([x.cpu() for x in ctx.data["responses"].unbind()]),
            "response_mask": nested_rows([torch.ones(n, dtype=torch.long) for n in lens]),
            "old_log_probs": nested_rows(old),
            "ref_log_prob": nested_rows(ref),
            "advantages": nested_rows(adv),
            PERCEPTION_FIELD: nested_rows([kept[i, :n].float() for i, n in enumerate(lens)]),
        },
        batch_size=len(lens),
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=sum(lens), global_batch_size=None)
    flat = []  # verl's packed output: response token j's log-prob at position P + j − 1 of its sequence
    for p, c in zip(prompts, cur, strict=True):
        flat += [torch.zeros(len(p) - 1), c, torch.zeros(1)]
    return data, torch.cat(flat)


def run_loss(config, data, flat, device):
    """verl's ppo_loss through the worker's wrapper on ``device``: (loss, metrics, d loss / d log-probs)."""
    from verl.workers.utils.losses import ppo_loss

    from vlcal_verl.verl_ext.perception import with_perception_mask

    lp = flat.detach().to(device, copy=True).requires_grad_(True)  # a leaf on each side: .grad is kept
    loss_fn = with_perception_mask(
        lambda model_output, data, dp_group=None: ppo_loss(config, model_output, data)
    )
    loss, metrics = loss_fn(model_output={"log_probs": lp}, data=data.to(device), dp_group=None)
    loss.backward()
    keys = ("actor/pg_loss", "kl_loss", "actor/perception_token_fraction")
    values = {k: float(getattr(metrics[k], "aggregate", lambda m=metrics[k]: m)()) for k in keys}
    return float(loss.detach()), values, lp.grad.detach().cpu()


def tar_inputs(ctx):
    import torch

    from vlcal_verl.vce import spans_to_mask

    pad = lambda rows: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # noqa: E731
    kl = pad([x.float().cpu() for x in ctx.exact["vce_kl"].unbind()])
    ent = pad([x.float().cpu() for x in ctx.exact["vce_entropy"].unbind()])
    resp = pad([torch.ones(len(x)) for x in ctx.exact["vce_kl"].unbind()])
    span = spans_to_mask([tuple(s) for s in ctx.spans.tolist()], resp)
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(len(resp), 1, generator=g).expand_as(resp).contiguous() * resp
    return adv, kl, ent, span, resp


def part_loss(ctx) -> dict:
    """Perception loss and TAR: device tensors against CPU tensors (tolerance: module docstring)."""
    import torch

    from vlcal_verl.tar import apply_tar
    from vlcal_verl.verl_ext.perception import register_perception_loss

    register_perception_loss()
    config = actor_config()
    data, flat = loss_inputs(ctx)
    cpu = run_loss(config, data, flat, "cpu")
    dev = run_loss(config, data, flat, ctx.device)
    checks = [("ppo_loss: loss", cpu[0], dev[0])]
    checks += [(f"ppo_loss: {k}", cpu[1][k], dev[1][k]) for k in cpu[1]]
    checks.append(("ppo_loss: d loss / d log_probs", cpu[2], dev[2]))
    tar_cpu = apply_tar(*tar_inputs(ctx))
    tar_dev = apply_tar(*(x.to(ctx.device) for x in tar_inputs(ctx)))
    checks.append(("TAR: reweighted advantages", tar_cpu[0], tar_dev[0].cpu()))
    checks += [(f"TAR: {k}", tar_cpu[1][k], tar_dev[1][k]) for k in tar_cpu[1]]
    out = []
    for name, a, b in checks:
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        same_nan = bool((a.isnan() == b.isnan()).all())
        a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
        d = float((a - b).abs().max()) if a.numel() else 0.0
        ok = same_nan and bool(torch.isfinite(b).all()) and bool(torch.allclose(b, a, rtol=RTOL, atol=ATOL))
        out.append(
            dict(name=name, max_abs_diff=d, tol=ATOL, ok=ok, cpu=float(a.flatten()[0]) if a.numel() else None)
        )
    versus = f"{ctx.device.type} vs cpu" if ctx.device.type != "cpu" else "cpu vs cpu (rehearsal)"
    return {"versus": versus, "checks": out, "kept_fraction": cpu[1]["actor/perception_token_fraction"],
            "ok": all(c["ok"] for c in out)}  # fmt: skip
