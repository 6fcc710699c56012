"""VLCalTrainer's new steps as pure arithmetic: rewards and advantages against hand-computed values.

Unit tests of the hooks' arithmetic only — the wiring is tested through verl's real loop
(``test_verl_cpu_loop.py``) and TransferQueue's real contract (``test_transfer_queue_contract.py``). The
trainer is built without ``__init__``; ``transfer_queue`` is replaced by a dict store with the contract
those tests pin down: every tensor field comes back jagged (fixed-width ones too), and ``kv_batch_put``
returns a new ``KVBatchMeta`` that lists the fields written so far.
"""

from __future__ import annotations

import math
import typing

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta

import vlcal_verl.verl_ext.trainer as trainer_mod
from vlcal_verl.config import VLCalConfig
from vlcal_verl.spans import vision_token_spans
from vlcal_verl.testing.tokenizer import qwen_tokenizer
from vlcal_verl.verl_ext.trainer import SPAN_FIELD, VLCalTrainer


class FakeTQ:
    """``tq.kv_batch_get/put`` over a dict: key → {field: per-sample value}."""

    def __init__(self):
        self.store: dict[str, dict] = {}

    def kv_batch_get(self, keys, partition_id, select_fields):
        out = {}
        for f in select_fields:
            vals = [self.store[k][f] for k in keys]
            if isinstance(vals[0], torch.Tensor):
                out[f] = torch.nested.as_nested_tensor(vals, layout=torch.jagged)
            else:
                out[f] = NonTensorStack(*vals)
        return TensorDict(out, batch_size=len(keys))

    def kv_batch_put(self, keys, partition_id, fields):
        for name in list(fields.keys()):
            col = fields[name]
            rows = col.unbind() if isinstance(col, torch.Tensor) else list(col)
            for k, v in zip(keys, rows, strict=True):
                self.store.setdefault(k, {})[name] = v
        listed = sorted(set().union(*(self.store[k].keys() for k in keys)))
        return KVBatchMeta(keys=list(keys), tags=[{} for _ in keys], partition_id=partition_id, fields=listed)


def Meta(keys, tags, partition_id="train"):
    return KVBatchMeta(keys=list(keys), tags=tags, partition_id=partition_id, fields=[])


class FakeActorWG:
    """compute_vce: constant KL_t / H_t per sample over the whole response (written to the store; H_t
    stands for verl's ``entropy`` of the old-log-prob pass, which the exact variant reads)."""

    def __init__(self, tq, values):
        self.tq, self.values, self.seen = tq, values, []

    def compute_vce(self, batch):
        # verl's worker-side bridge fetches only the fields the handle lists
        assert SPAN_FIELD in batch.fields, batch.fields
        self.seen.append(dict(batch.extra_info))
        for k in batch.keys:
            n = self.tq.store[k]["responses"].shape[0]
            kl, h = self.values[k]
            self.tq.store[k]["vce_kl"] = torch.full((n,), kl)
            self.tq.store[k]["vce_entropy"] = torch.full((n,), h)
            self.tq.store[k]["entropy"] = torch.full((n,), h)
            self.tq.store[k]["vce_masked_logp"] = torch.zeros(n)
            self.tq.store[k].setdefault("old_log_probs", torch.zeros(n))
        return batch


def _trainer(monkeypatch, vlcal: VLCalConfig, wg=None):
    fake = FakeTQ()
    monkeypatch.setattr(trainer_mod, "tq", fake)
    t = object.__new__(VLCalTrainer)
    t.vlcal = vlcal
    # verl always composes trainer.rollout_data_dir (null unless set: no S̃_vis rollout dump)
    t.config = OmegaConf.create(
        {"actor_rollout_ref": {"rollout": {"temperature": 1.0}}, "trainer": {"rollout_data_dir": None}}
    )
    t.tokenizer = qwen_tokenizer()
    t.timing_raw = {}
    t.actor_rollout_wg = wg
    return t, fake


RESPONSES = {
    "a_0_0": "<think><vision> a red circle </vision><reasoning> red </reasoning></think> \\boxed{red}",
    "a_1_0": "<think><vision> a blue square on the left </vision><reasoning> blue </reasoning></think> \\boxed{blue}",
    "b_0_0": "I think the answer is \\boxed{3}",  # no vision block → no span
    "pad": "<think><vision> padding row </vision></think>",
}


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_visual_reward_hook_hand_computed(monkeypatch):
    vlcal = VLCalConfig()
    t, fake = _trainer(monkeypatch, vlcal)
    scores = {"a_0_0": 1.5, "a_1_0": -0.5, "b_0_0": 0.2, "pad": 9.0}
    c_v = {"a_0_0": 0.3, "a_1_0": 0.9, "b_0_0": 0.5, "pad": 0.5}
    for k, text in RESPONSES.items():
        ids = torch.tensor(t.tokenizer(text, add_special_tokens=False)["input_ids"])
        rm = torch.zeros(len(ids))
        rm[-1] = scores[k]
        fake.store[k] = {
            "responses": ids,
            "response_mask": torch.ones(len(ids), dtype=torch.long),
            "rm_scores": rm,
            "extra_fields": {"reward_extra_info": {"vision_confidence": c_v[k]}},
        }
    # K̄/H̄ = 2/2 → S = 0 ; 4/1 → S = log 4 ; the padding row's extreme S must be ignored
    t.actor_rollout_wg = FakeActorWG(
        fake, {"a_0_0": (2.0, 2.0), "a_1_0": (4.0, 1.0), "b_0_0": (5.0, 1.0), "pad": (1e4, 1e-4)}
    )
    meta = Meta(keys=list(RESPONSES), tags=[{}, {}, {}, {"is_padding": True}])
    metrics = {}
    t._vlcal_visual_reward(meta, metrics)

    # the spans the trainer stored are H1's, and cover the z_vis text
    expect_spans = vision_token_spans([fake.store[k]["responses"].numpy() for k in RESPONSES], t.tokenizer)
    got = [tuple(fake.store[k][SPAN_FIELD].tolist()) for k in RESPONSES]
    assert got == [s if s is not None else (-1, -1) for s in expect_spans]
    s0, e0 = got[0]
    assert "red circle" in t.tokenizer.decode(fake.store["a_0_0"]["responses"][s0:e0])
    assert got[2] == (-1, -1)
    # the worker saw the VCE settings; they do not linger on the batch
    assert (
        t.actor_rollout_wg.seen[0]["vlcal_vce"]["estimator"] == "exact" and "vlcal_vce" not in meta.extra_info
    )

    w = vlcal.reward.w_vis
    expected = {
        "a_0_0": 1.5 - w * (0.3 - sig(-1)) ** 2,
        "a_1_0": -0.5 - w * (0.9 - sig(1)) ** 2,
        "b_0_0": 0.2 - w * 1.0,
        "pad": 9.0,
    }
    for k, value in expected.items():
        rm = fake.store[k]["rm_scores"]
        assert rm[-1].item() == pytest.approx(value, abs=1e-5), k
        assert rm[:-1].abs().sum().item() == 0.0
    assert metrics["vce/span_rate"] == pytest.approx(2 / 3) and metrics["vce/time_s"] >= 0


def _with_signal_fields(store):
    for row in store.values():  # exact variant: KL_t from vce_kl, H_t = verl's entropy
        n = row["advantages"].shape[0]
        row |= {
            "entropy": row["vce_entropy"],
            "old_log_probs": torch.zeros(n),
            "vce_masked_logp": torch.zeros(n),
        }
    return store


def test_tar_hook_hand_computed(monkeypatch):
    t, fake = _trainer(monkeypatch, VLCalConfig())
    e = math.e
    fake.store = {
        "x": {
            "advantages": torch.tensor([-1.0, -1.0, -1.0]),
            "response_mask": torch.ones(3, dtype=torch.long),
            SPAN_FIELD: torch.tensor([0, 2]),
            "vce_kl": torch.tensor([e, 1.0, 7.0]),
            "vce_entropy": torch.ones(3),
        },
        "y": {
            "advantages": torch.tensor([0.5, 0.5]),
            "response_mask": torch.ones(2, dtype=torch.long),
            SPAN_FIELD: torch.tensor([0, 2]),
            "vce_kl": torch.tensor([e, 1.0]),
            "vce_entropy": torch.ones(2),
        },
        "pad": {
            "advantages": torch.tensor([-1.0, -1.0]),
            "response_mask": torch.ones(2, dtype=torch.long),
            SPAN_FIELD: torch.tensor([0, 2]),
            "vce_kl": torch.tensor([e, 1.0]),
            "vce_entropy": torch.ones(2),
        },
    }
    _with_signal_fields(fake.store)
    metrics = {}
    t._vlcal_tar(Meta(keys=["x", "y", "pad"], tags=[{}, {}, {"is_padding": True}]), metrics)
    z = 1 / math.sqrt(2)  # s = (1, 0) on the span → Bessel z = ±1/√2
    w0, w1 = 1.1 - 0.2 * sig(z), 1.1 - 0.2 * sig(-z)
    assert fake.store["x"]["advantages"].tolist() == pytest.approx([-w0, -w1, -1.0], abs=1e-6)
    assert fake.store["y"]["advantages"].tolist() == [0.5, 0.5]
    assert fake.store["pad"]["advantages"].tolist() == [-1.0, -1.0]
    assert metrics["tar/weight_mean"] == pytest.approx((w0 + w1) / 2, abs=1e-6)


AUTHORS = VLCalConfig.from_dict(
    {
        "variant": "authors",
        "reward": {"reference_parity": True},
        "vce": {"estimator": "reference", "entropy": "nll", "scope": "full"},
        "tar": {"scope": "response", "kl": "k3_clamped", "entropy": "nll"},
        "perception": {"enabled": True, "top_fraction": 0.2},
    }
)


def test_authors_variant_hooks_hand_computed(monkeypatch):
    """Sampled-token signals from verl's old log-probs and VCE's masked log-probs; S with the NLL; the
    perception mask of each response; TAR with clamped k3, NLL and the unbiased std over the response."""
    t, fake = _trainer(monkeypatch, AUTHORS)
    old = {
        k: -0.5 * torch.ones(len(t.tokenizer(v, add_special_tokens=False)["input_ids"]))
        for k, v in RESPONSES.items()
    }
    for k, text in RESPONSES.items():
        ids = torch.tensor(t.tokenizer(text, add_special_tokens=False)["input_ids"])
        rm = torch.zeros(len(ids))
        rm[-1] = 1.0
        fake.store[k] = {
            "responses": ids,
            "response_mask": torch.ones(len(ids), dtype=torch.long),
            "rm_scores": rm,
            "old_log_probs": old[k],
            "extra_fields": {"reward_extra_info": {"vision_confidence": 0.5}},
        }

    class MaskedWG:  # log p_masked = old − d_t with d_t = 0.1·t (t = token index): later tokens moved more
        seen: typing.ClassVar[list] = []

        def compute_vce(self, batch):
            self.seen.append(dict(batch.extra_info))
            for k in batch.keys:
                n = fake.store[k]["responses"].shape[0]
                fake.store[k]["vce_masked_logp"] = old[k] - 0.1 * torch.arange(n)
            return batch

    t.actor_rollout_wg = MaskedWG()
    metrics = {}
    meta = t._vlcal_visual_reward(
        Meta(keys=list(RESPONSES), tags=[{}, {}, {}, {"is_padding": True}]), metrics
    )
    assert "vce_kl" not in fake.store["a_0_0"]  # nothing asked for the full-vocabulary KL

    # K_t (reference) = p_old·clamp(log p_old − log p_masked) = e^-0.5 · 0.1·t; H_t = 0.5
    s_of = {}
    for k in ("a_0_0", "a_1_0"):
        s0, e0 = fake.store[k][SPAN_FIELD].tolist()
        k_bar = sum(math.exp(-0.5) * 0.1 * i for i in range(s0, e0)) / (e0 - s0)
        s_of[k] = math.log(k_bar + 1e-8) - math.log(0.5 + 1e-8)
    mu = (s_of["a_0_0"] + s_of["a_1_0"]) / 2
    sd = abs(s_of["a_0_0"] - mu)  # population std of two values
    want = 1.0 - 0.4 * (0.5 - sig((s_of["a_0_0"] - mu) / sd)) ** 2
    assert fake.store["a_0_0"]["rm_scores"][-1].item() == pytest.approx(want, abs=1e-5)

    # perception mask: the last ⌈0.2·n⌉ tokens (largest d_t), none on the padding row
    for k in RESPONSES:
        mask = fake.store[k]["vlcal_perception_mask"]
        n = mask.shape[0]
        k_keep = math.ceil(0.2 * n)
        expect = [0.0] * (n - k_keep) + [1.0] * k_keep if k != "pad" else [0.0] * n
        assert mask.tolist() == expect, k
    assert "vlcal_perception_mask" in meta.fields  # the actor's update will fetch it

    # TAR: s_t = log(k3_clamped(d_t)) − log(0.5), z over the whole response (Bessel), applied on the span
    adv = {k: -torch.ones(len(old[k])) for k in RESPONSES}
    for k in RESPONSES:
        fake.store[k]["advantages"] = adv[k]
    t._vlcal_tar(Meta(keys=list(RESPONSES), tags=[{}, {}, {}, {"is_padding": True}]), {})
    row = fake.store["a_0_0"]
    n = len(old["a_0_0"])
    st = [math.log(math.exp(-0.1 * i) + 0.1 * i - 1 + 1e-8) - math.log(0.5 + 1e-8) for i in range(n)]
    m = sum(st) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in st) / (n - 1))
    s0, e0 = row[SPAN_FIELD].tolist()
    for i in range(n):
        w = 1.1 - 0.2 * sig((st[i] - m) / sd) if s0 <= i < e0 else 1.0
        assert row["advantages"][i].item() == pytest.approx(-w, abs=1e-5), i


def test_calibration_metrics_hook(monkeypatch):
    t, fake = _trainer(monkeypatch, VLCalConfig())
    infos = [
        {
            "accuracy": 1.0,
            "parse_ok": True,
            "confidence": 0.9,
            "vision_confidence": 0.8,
            "reasoning_confidence": 1.0,
        },
        {
            "accuracy": 0.0,
            "parse_ok": False,
            "confidence": None,
            "vision_confidence": None,
            "reasoning_confidence": None,
        },
    ]
    for i, info in enumerate(infos):
        fake.store[str(i)] = {"extra_fields": {"reward_extra_info": info}}
    metrics = {}
    t._vlcal_calibration_metrics(Meta(keys=["0", "1"], tags=[{}, {}]), metrics)
    assert metrics["calib/parse_rate"] == 0.5 and metrics["calib/accuracy"] == 0.5
    assert metrics["calib/c_v_mean"] == pytest.approx(0.8)


def test_actor_roles_run_the_vlcal_worker(monkeypatch):
    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    def fake_super(self):
        self.role_worker_mapping = {Role.ActorRolloutRef: object, Role.Critic: int}

    monkeypatch.setattr(PPOTrainer, "_init_resource_pool_mgr", fake_super)
    t, _ = _trainer(monkeypatch, VLCalConfig())
    t._init_resource_pool_mgr()
    actor_cls = t.role_worker_mapping[Role.ActorRolloutRef].__ray_actor_class__
    assert actor_cls.__name__ == "VLCalActorRolloutRefWorker"
    assert t.role_worker_mapping[Role.Critic] is int
