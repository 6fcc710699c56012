"""The perception filter inside verl 0.9.1's own actor loss (``verl.workers.utils.losses.ppo_loss``).

verl's loss function is called as the FSDP engine calls it, on a micro-batch laid out as verl lays it out
(jagged per-sample fields, flat log-probs of the packed sequence), with the actor config verl builds from
our recipe. Expected values are written out by hand: with the filter the policy-gradient term is the mean
of −A_t over the *kept* tokens (ratio 1 at the old policy) and the KL term is unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.losses import ppo_loss

from vlcal_verl.main import compose_recipe, prepare
from vlcal_verl.verl_ext.perception import (
    PERCEPTION_FIELD,
    PERCEPTION_TOKENS_KEY,
    register_perception_loss,
    with_perception_mask,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def actor_config():
    register_perception_loss()
    cfg = compose_recipe(ROOT / "recipes" / "qwen3_vl_4b.yaml")
    prepare(cfg)
    from omegaconf import OmegaConf

    actor = OmegaConf.create(OmegaConf.to_container(cfg.actor_rollout_ref.actor, resolve=True))
    return omega_conf_to_dataclass(actor)


def _jagged(rows):
    return torch.nested.as_nested_tensor([torch.as_tensor(r) for r in rows], layout=torch.jagged)


def micro_batch(kept_rows, dp_tokens=None):
    """Two samples: prompts of 3 and 2 tokens, responses of 4 and 5; old = current log-probs."""
    resp = [[-0.5, -1.0, -0.2, -2.0], [-0.3, -0.7, -1.5, -0.1, -0.9]]
    ref = [[-0.6, -1.0, -0.1, -2.5], [-0.3, -0.5, -1.5, -0.4, -0.9]]
    adv = [[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, -2.0, -2.0]]
    prompts = [[1, 2, 3], [4, 5]]
    data = TensorDict(
        {
            "prompts": _jagged(prompts),
            "responses": _jagged([[7] * 4, [8] * 5]),
            "response_mask": _jagged([[1] * 4, [1] * 5]),
            "old_log_probs": _jagged(resp),
            "ref_log_prob": _jagged(ref),
            "advantages": _jagged(adv),
        },
        batch_size=2,
    )
    if kept_rows is not None:
        data[PERCEPTION_FIELD] = _jagged(kept_rows)
    n_tokens = 9
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=n_tokens, global_batch_size=None)
    if dp_tokens is not None:
        tu.assign_non_tensor(data, **{PERCEPTION_TOKENS_KEY: dp_tokens})
    # verl's packed model output: log-prob of response token j at position P + j − 1 of its sequence
    flat = []
    for p, r in zip(prompts, resp, strict=True):
        flat += [0.0] * (len(p) - 1) + r + [0.0]
    return data, {"log_probs": torch.tensor(flat)}, resp, ref, adv


def value(metric):
    """The one value of a verl ``Metric`` (or a plain number)."""
    vals = getattr(metric, "values", None)
    if vals is None:
        return float(metric)
    assert len(vals) == 1, vals
    return float(vals[0])


def low_var_kl(lp, ref):
    d = max(min(ref - lp, 20.0), -20.0)
    return min(max(math.exp(d) - d - 1, -10.0), 10.0)


def test_filter_changes_the_pg_loss_and_leaves_the_kl_loss(actor_config):
    assert actor_config.policy_loss.loss_mode == "vlcal_perception"
    kept = [[1, 0, 0, 0], [0, 1, 1, 0, 0]]
    data, out, resp, ref, _ = micro_batch(kept)
    loss_fn = with_perception_mask(
        lambda model_output, data, dp_group=None: ppo_loss(actor_config, model_output, data, dp_group)
    )
    loss, metrics = loss_fn(model_output=out, data=data, dp_group=None)

    # pg: −A averaged over the 3 kept tokens (ratio 1): −(1 − 2 − 2)/3 = 1
    kl = (
        sum(low_var_kl(a, b) for ra, rb in zip(resp, ref, strict=True) for a, b in zip(ra, rb, strict=True))
        / 9
    )
    coef = actor_config.kl_loss_coef
    assert value(metrics["actor/pg_loss"]) == pytest.approx(1.0, abs=1e-6)
    assert value(metrics["kl_loss"]) == pytest.approx(kl, abs=1e-6)  # all 9 tokens, as without the filter
    assert loss.item() == pytest.approx(1.0 + coef * kl, abs=1e-6)
    assert value(metrics["actor/perception_token_fraction"]) == pytest.approx(3 / 9)

    # the same batch with every token kept: verl's vanilla number, −(4·1 − 5·2)/9 = 2/3
    data_all, out_all, *_ = micro_batch([[1] * 4, [1] * 5])
    _, m_all = loss_fn(model_output=out_all, data=data_all, dp_group=None)
    assert value(m_all["actor/pg_loss"]) == pytest.approx(2 / 3, abs=1e-6)
    assert value(m_all["kl_loss"]) == pytest.approx(kl, abs=1e-6)


def test_normalised_by_the_global_kept_tokens(actor_config):
    """On one DP rank of several: verl's token-mean divides by the mini-batch's global token count; the
    filter divides by the global *kept* count the worker put on the batch (here 6 over all ranks)."""
    data, out, *_ = micro_batch([[1, 0, 0, 0], [0, 1, 1, 0, 0]], dp_tokens=6.0)
    loss_fn = with_perception_mask(
        lambda model_output, data, dp_group=None: ppo_loss(actor_config, model_output, data, dp_group)
    )
    _, metrics = loss_fn(model_output=out, data=data, dp_group=None)
    assert value(metrics["actor/pg_loss"]) == pytest.approx(3.0 / 6.0, abs=1e-6)  # −(1 − 2 − 2) / 6
    assert actor_config.global_batch_info["batch_num_tokens"] == 9  # restored for the KL term and after


def test_without_the_mask_the_mode_refuses(actor_config):
    data, out, *_ = micro_batch(None)
    with pytest.raises(RuntimeError, match="vlcal_perception_mask"):
        ppo_loss(actor_config, out, data, None)
