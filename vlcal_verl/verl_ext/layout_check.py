"""Batch and parallel layout: verl 0.9.1's size and divisibility assertions, checked before Ray starts.

Why: verl checks most of these only where it uses them — in the workers after the model loaded, or in the
trainer's update after a whole step of generation (``--check`` passed ``train_batch_size=3 rollout.n=3
ppo_mini_batch_size=3`` on two FSDP ranks; the run died 164 s later in ``update_actor``). With dynamic
batch sizes (this project's default) verl also skips its own mini-batch checks. :func:`layout_problem`
recomputes each one from the composed config, in plain arithmetic (no verl, no Ray import), and returns
one line naming the numbers and a valid alternative; ``vlcal_verl.main.prepare`` turns it into exit code 2.

Sizes. ``W = trainer.n_gpus_per_node × trainer.nnodes``: the V1 trainer's one actor/rollout/ref worker
group (on ``trainer.device=cpu`` the FSDP ranks, logical GPUs of the private Ray head). FSDP data-parallel
size ``dp = W / ulysses`` (``FSDPEngine.get_data_parallel_size``, engine/fsdp/transformer_impl.py:651).
``B = data.train_batch_size`` prompts, ``n = rollout.n``, ``M = actor.ppo_mini_batch_size`` prompts.

verl's assertions (verl 0.9.1, paths under ``verl/``) and the rule here:

* workers/engine_workers.py:267 (``train_mini_batch``): ``M·n % dp == 0`` — the issue's crash.
* engine/fsdp/transformer_impl.py:247 (Ulysses mesh ``(W/sp, sp)``, torch's ``init_device_mesh``):
  ``W % sp == 0`` for the actor and the ref; :148 and workers/config/actor.py:333: ``sp > 1`` needs
  ``model.use_remove_padding``; models/transformers/monkey_patch.py:343/346: attention heads ``% sp == 0``
  and KV heads ``% sp == 0`` or ``sp % kv == 0`` (when the model's ``config.json`` is readable here).
* engine/fsdp/utils.py:47-51 (``create_device_mesh``): ``fsdp_size`` < 0, ≥ W, or a divisor of W.
* workers/engine_workers.py:659: ``W % (rollout TP × DP × PP) == 0``; workers/rollout/replica.py:114: a
  replica's size ``R`` is a multiple of ``min(n_gpus_per_node, R)``; workers/rollout/vllm_rollout/
  vllm_async_server.py:385: vLLM with rollout DP > 1 needs ``min(n_gpus_per_node, R) % TP == 0``.
  (workers/config/rollout.py:295 expert parallel = TP × DP and :319 PP are verl's own dataclass checks,
  run before Ray by ``main.check_worker_configs``.)
* trainer/ppo/v1/trainer_base.py:535: ``B % trainer.v1.sync.parameter_sync_step == 0``; :1485:
  ``B % data.gen_batch_size == 0`` (unless DAPO filtering forces gen_batch_size 1, :733).
* utils/config.py:124 (``validate_config``, fixed micro-batches only): ``B·n % W == 0``.
* workers/engine_workers.py:616: ``actor.use_dynamic_bsz == rollout.log_prob_use_dynamic_bsz``; :633-637
  and the ref's ``ActorConfig`` (built at :574-582, workers/config/actor.py:201-207): token budgets set
  with dynamic batch sizes, ``*_micro_batch_size_per_gpu`` set without (the engine worker reads only
  the per-GPU keys, so the deprecated global ``ppo_micro_batch_size`` fails there too).
* workers/engine/utils.py:125 (fixed micro-batches): every rank's batch is a multiple of its micro-batch:
  ``M·n/dp`` for the update, the padded batch per rank for the actor's and the ref's log-prob passes.
* Item 6 of issue 26 (a decision, not a crash): ``M ≤ B`` (verl's workers/config/actor.py:225, skipped with
  dynamic batch sizes) and ``B % M == 0``. Otherwise trainer/ppo/v1/trainer_base.py:1589-1621 pads each
  batch with synthetic 128-token no-op sequences up to a multiple of ``lcm(dp, M·n)``: ``M = 7`` of 256
  gives 37 optimizer steps (the last partly padding) instead of the authors' one; ``M = 300`` one step
  with 352 wasted sequences. Neither is a setting anyone means, so both are refused.
* Warning only — utils/seqlen_balancing.py:384 (dynamic batch sizes): ``max_token_len_per_gpu × sp`` ≥
  the longest sequence. The bound ``max_prompt_length + max_response_length`` is not always reached, and
  tests set tighter budgets on purpose, so a smaller budget is named with its effect, not refused.

Checked and not a constraint: the agent loop splits prompts over ``agent.num_workers`` unevenly
(``TensorDict.chunk``, trainer/ppo/v1/agent_loop_tq.py:251), and ``KVBatchMeta.chunk`` dispatches uneven
per-rank shares. Rules are computed for verl's FSDP engine, the only one this project runs (VCE needs it);
other strategies are left to verl. The critic (never used by GRPO) is left to verl's ``validate_config``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AR = "actor_rollout_ref"


@dataclass(frozen=True)
class Layout:
    """The numbers verl's assertions read, from one composed config (see :meth:`from_config`)."""

    gpus_per_node: int
    nnodes: int
    batch: int  # B, prompts per step
    n: int  # rollouts per prompt
    mini: Any  # M, prompts per optimizer step (checked to be a positive int)
    actor_sp: int = 1
    ref_sp: int = 1
    actor_fsdp_size: int = -1
    ref_fsdp_size: int = -1
    remove_padding: bool = True
    use_ref: bool = True
    actor_dynamic: bool = True
    rollout_dynamic: bool = True
    ref_dynamic: bool = True
    actor_mbs: Any = None  # actor.ppo_micro_batch_size_per_gpu
    actor_mbs_global: Any = None  # actor.ppo_micro_batch_size (deprecated)
    rollout_mbs: Any = None  # rollout.log_prob_micro_batch_size_per_gpu
    rollout_mbs_global: Any = None
    ref_mbs: Any = None  # ref.log_prob_micro_batch_size_per_gpu
    ref_mbs_global: Any = None
    actor_tokens: Any = 16384  # actor.ppo_max_token_len_per_gpu
    rollout_tokens: Any = 16384  # rollout.log_prob_max_token_len_per_gpu
    ref_tokens: Any = 16384  # ref.log_prob_max_token_len_per_gpu
    max_prompt: int = 0
    max_response: int = 0
    rollout_name: str = "vllm"
    tp: int = 1
    rollout_dp: int = 1
    pp: int = 1
    sync_step: Any = 1  # trainer.v1.sync.parameter_sync_step
    gen_batch: Any = None  # data.gen_batch_size (None: = B)
    heads: tuple[int, int] | None = None  # (attention, key-value) heads of the language model
    fsdp: bool = True

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nnodes

    @property
    def dp(self) -> int:
        return self.world // self.actor_sp

    @property
    def padded(self) -> int:
        """Rollouts per step after verl's ``_balance_batch`` pads to a multiple of ``lcm(dp, M·n)``."""
        multiple = math.lcm(self.dp, self.mini * self.n)
        return -(-self.batch * self.n // multiple) * multiple

    @classmethod
    def from_config(cls, config: Any) -> Layout:
        ar, data, trainer = config[AR], config.data, config.trainer
        actor, ref, rollout = ar.actor, ar.ref, ar.rollout
        algorithm = config.get("algorithm") or {}
        sampler = (trainer.get("v1") or {}).get("sampler") or {}
        exact_refill = bool((algorithm.get("filter_groups") or {}).get("enable", False)) or bool(
            sampler.get("sync_refill_failed_groups", False)
        )
        return cls(
            gpus_per_node=int(trainer.n_gpus_per_node),
            nnodes=int(trainer.nnodes),
            batch=int(data.train_batch_size),
            n=int(rollout.n),
            mini=actor.get("ppo_mini_batch_size"),
            actor_sp=_sp(actor),
            ref_sp=_sp(ref),
            actor_fsdp_size=int((actor.get("fsdp_config") or {}).get("fsdp_size", -1)),
            ref_fsdp_size=int((ref.get("fsdp_config") or {}).get("fsdp_size", -1)),
            remove_padding=bool(ar.model.get("use_remove_padding", False)),
            use_ref=bool(algorithm.get("use_kl_in_reward", False) or actor.get("use_kl_loss", False)),
            actor_dynamic=bool(actor.get("use_dynamic_bsz", False)),
            rollout_dynamic=bool(rollout.get("log_prob_use_dynamic_bsz", False)),
            ref_dynamic=bool(ref.get("log_prob_use_dynamic_bsz", False)),
            actor_mbs=actor.get("ppo_micro_batch_size_per_gpu"),
            actor_mbs_global=actor.get("ppo_micro_batch_size"),
            rollout_mbs=rollout.get("log_prob_micro_batch_size_per_gpu"),
            rollout_mbs_global=rollout.get("log_prob_micro_batch_size"),
            ref_mbs=ref.get("log_prob_micro_batch_size_per_gpu"),
            ref_mbs_global=ref.get("log_prob_micro_batch_size"),
            actor_tokens=actor.get("ppo_max_token_len_per_gpu"),
            rollout_tokens=rollout.get("log_prob_max_token_len_per_gpu"),
            ref_tokens=ref.get("log_prob_max_token_len_per_gpu"),
            max_prompt=int(data.get("max_prompt_length") or 0),
            max_response=int(data.get("max_response_length") or 0),
            rollout_name=str(rollout.get("name", "vllm")),
            tp=int(rollout.get("tensor_model_parallel_size", 1) or 1),
            rollout_dp=int(rollout.get("data_parallel_size", 1) or 1),
            pp=int(rollout.get("pipeline_model_parallel_size", 1) or 1),
            sync_step=((trainer.get("v1") or {}).get("sync") or {}).get("parameter_sync_step", 1),
            gen_batch=None if exact_refill else data.get("gen_batch_size"),
            heads=model_heads(ar.model.get("path")),
            fsdp=str(actor.get("strategy", "fsdp")) in ("fsdp", "fsdp2"),
        )


def _sp(role: Any) -> int:
    """Effective Ulysses size: the deprecated role key wins when > 1 (``FSDPActorConfig.__post_init__``)."""
    legacy = int(role.get("ulysses_sequence_parallel_size", 1) or 1)
    return (
        legacy
        if legacy > 1
        else int((role.get("fsdp_config") or {}).get("ulysses_sequence_parallel_size", 1) or 1)
    )


def model_heads(path: Any) -> tuple[int, int] | None:
    """(attention, KV) heads from the checkpoint's ``config.json`` (top level, else ``text_config``, as
    verl's monkey patch reads them); None when the folder is not readable here (a login node)."""
    try:
        cfg = json.loads((Path(str(path)) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    for block in (cfg, cfg.get("text_config") or {}, cfg.get("llm_config") or {}):
        heads, kv = block.get("num_attention_heads"), block.get("num_key_value_heads")
        if isinstance(heads, int) and heads > 0:
            return heads, kv if isinstance(kv, int) and kv > 0 else heads
    return None


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def mini_batch_alternatives(lay: Layout) -> str:
    """Nearest valid ``ppo_mini_batch_size`` values (divisors of B with ``M·n % dp == 0``), else a batch, an
    ``n`` or (one node) a GPU count that works."""
    ok = [m for m in _divisors(lay.batch) if m * lay.n % lay.dp == 0]
    if ok:
        picks = sorted(
            {*[m for m in ok if m <= lay.mini][-1:], *[m for m in ok if m > lay.mini][:1], *ok[-1:]}
        )
        authors = " (one optimizer step per batch, the authors' setting)"
        return " or ".join(
            f"{AR}.actor.ppo_mini_batch_size={m}" + (authors if m == lay.batch else "") for m in picks
        )
    step = lay.dp // math.gcd(lay.n, lay.dp)  # M must be a multiple of this
    batch = -(-lay.batch // step) * step
    n_step = lay.dp // math.gcd(lay.mini, lay.dp)
    out = f"data.train_batch_size={batch} {AR}.actor.ppo_mini_batch_size={batch}, or {AR}.rollout.n={-(-lay.n // n_step) * n_step}"
    gpus = math.gcd(lay.world, lay.mini * lay.n * lay.actor_sp)  # then dp = gpus / sp divides M·n
    if lay.nnodes == 1 and gpus % (lay.tp * lay.rollout_dp * lay.pp) == 0:
        out += f", or trainer.n_gpus_per_node={gpus}"
    return out


def _parallel_rules(lay: Layout) -> Iterator[str]:
    """Device meshes: Ulysses, FSDP size, rollout replicas."""
    w = lay.world
    for role, sp, fsdp_size in (
        ("actor", lay.actor_sp, lay.actor_fsdp_size),
        ("ref", lay.ref_sp, lay.ref_fsdp_size),
    ):
        if role == "ref" and not lay.use_ref:
            continue
        key = f"{AR}.{role}.ulysses_sequence_parallel_size"
        if sp < 1 or w % sp:
            yield (
                f"{key}={sp} does not divide the {w} GPUs (trainer.n_gpus_per_node × nnodes = "
                f"{lay.gpus_per_node} × {lay.nnodes}): verl's Ulysses mesh is ({w}/sp, sp); use one of {_divisors(w)}"
            )
        if sp > 1 and not lay.remove_padding:
            yield f"{key}={sp} needs {AR}.model.use_remove_padding=true (verl's FSDP engine refuses it otherwise)"
        if sp > 1 and lay.heads:
            heads, kv = lay.heads
            if heads % sp or (kv % sp and sp % kv):
                ok = [d for d in _divisors(w) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
                yield (
                    f"{key}={sp}: the model's {heads} attention / {kv} key-value heads cannot be split "
                    f"{sp} ways (verl's Ulysses patch asserts it); use one of {ok}"
                )
        fkey = f"{AR}.{role}.fsdp_config.fsdp_size"
        if fsdp_size == 0 or (0 < fsdp_size < w and w % fsdp_size):
            yield (
                f"{fkey}={fsdp_size} must be -1 (all {w} GPUs), >= {w}, or a divisor of {w} "
                f"(verl's FSDP mesh is ({w}/fsdp_size, fsdp_size)); use -1 or one of {_divisors(w)}"
            )
    size = lay.tp * lay.rollout_dp * lay.pp
    sizes = (
        f"tensor_model_parallel_size × data_parallel_size × pipeline = {lay.tp} × {lay.rollout_dp} × {lay.pp}"
    )
    if w % size:
        yield (
            f"a rollout replica spans {size} GPUs ({sizes}), which does not divide the {w} GPUs "
            f"(trainer.n_gpus_per_node × nnodes); use a TP × DP that divides {w}, e.g. "
            f"{AR}.rollout.tensor_model_parallel_size={math.gcd(w, lay.tp)} data_parallel_size=1"
        )
    per_node = min(lay.gpus_per_node, size)
    if size % per_node:
        yield (
            f"a rollout replica of {size} GPUs ({sizes}) spans nodes of {lay.gpus_per_node} GPUs unevenly "
            f"(verl needs a multiple of {per_node}); use a replica size that divides or is a multiple of "
            f"trainer.n_gpus_per_node={lay.gpus_per_node}"
        )
    if lay.rollout_name == "vllm" and lay.rollout_dp > 1 and per_node % lay.tp:
        yield (
            f"vLLM with {AR}.rollout.data_parallel_size={lay.rollout_dp} needs the {per_node} GPUs a replica "
            f"has on a node to be a multiple of tensor_model_parallel_size={lay.tp}; use a TP dividing {per_node}"
        )


def _batch_rules(lay: Layout) -> Iterator[str]:
    """Prompts per step, per mini-batch, per rank."""
    b, n, m, dp, mkey = lay.batch, lay.n, lay.mini, lay.dp, f"{AR}.actor.ppo_mini_batch_size"
    if not _positive(m):
        yield f"{mkey} must be a positive integer (prompts per optimizer step), got {m!r}"
        return
    if m > b:
        yield (
            f"{mkey}={m} is larger than data.train_batch_size={b}: verl would pad every step with "
            f"{lay.padded - b * n} "
            f"synthetic sequences for its one optimizer step (its own check is skipped with dynamic batch "
            f"sizes); use {mini_batch_alternatives(lay)}"
        )
        return
    if b % m:
        yield (
            f"data.train_batch_size={b} is not a multiple of {mkey}={m}: verl pads each batch with "
            f"{lay.padded - b * n} synthetic no-op sequences into {lay.padded // (m * n)} uneven optimizer steps; "
            f"use a divisor of {b}, e.g. {mini_batch_alternatives(lay)}"
        )
        return
    if m * n % dp:
        yield (
            f"{mkey} × rollout.n = {m} × {n} = {m * n} rollouts per mini-batch is not divisible by the actor's "
            f"data-parallel size {dp} (trainer.n_gpus_per_node × nnodes / Ulysses = {lay.gpus_per_node} × "
            f"{lay.nnodes} / {lay.actor_sp}); verl asserts it in update_actor: use e.g. {mini_batch_alternatives(lay)}"
        )
    step = lay.sync_step
    if not _positive(step) or b % step:
        yield (
            f"trainer.v1.sync.parameter_sync_step={step!r} must be a positive divisor of data.train_batch_size={b} "
            f"(verl splits each step into that many updates); use one of {_divisors(b)}"
        )
    g = lay.gen_batch
    if g is not None and (not _positive(g) or b % g):
        yield (
            f"data.gen_batch_size={g!r} must be a positive divisor of data.train_batch_size={b} (verl fetches "
            f"prompts in whole gen_batch_size chunks); use null or one of {_divisors(b)}"
        )
    if not lay.actor_dynamic and b * n % lay.world:
        q = lay.world // math.gcd(n, lay.world)  # B must be a multiple of this
        batch = -(-b // q) * q
        mini = m if batch % m == 0 else batch
        yield (
            f"data.train_batch_size × rollout.n = {b} × {n} = {b * n} is not divisible by the {lay.world} GPUs "
            f"(verl's validate_config, fixed micro-batches); use e.g. data.train_batch_size={batch} {mkey}={mini}"
        )


def _micro_rules(lay: Layout) -> Iterator[str]:
    """Micro-batches: dynamic (token budgets) or fixed (per-GPU sizes), as verl's engine worker reads them."""
    if lay.actor_dynamic != lay.rollout_dynamic:
        yield (
            f"{AR}.actor.use_dynamic_bsz={lay.actor_dynamic} and {AR}.rollout.log_prob_use_dynamic_bsz="
            f"{lay.rollout_dynamic} must match (verl's engine worker asserts it); set both to the same value"
        )
        return
    roles = [
        ("actor", "ppo", lay.actor_dynamic, lay.actor_tokens, lay.actor_mbs, lay.actor_mbs_global),
        (
            "rollout",
            "log_prob",
            lay.rollout_dynamic,
            lay.rollout_tokens,
            lay.rollout_mbs,
            lay.rollout_mbs_global,
        ),
    ]
    if lay.use_ref:
        roles.append(("ref", "log_prob", lay.ref_dynamic, lay.ref_tokens, lay.ref_mbs, lay.ref_mbs_global))
    for role, prefix, dynamic, tokens, mbs, mbs_global in roles:
        base = f"{AR}.{role}.{prefix}"
        if dynamic and not _positive(tokens):
            yield f"{base}_max_token_len_per_gpu must be a positive integer with dynamic batch sizes, got {tokens!r}"
        if not dynamic and not _positive(mbs):
            hint = (
                f" ({base}_micro_batch_size={mbs_global} is deprecated and not read by verl's engine worker)"
            )
            yield (
                f"{base}_micro_batch_size_per_gpu must be a positive integer without dynamic batch sizes, got "
                f"{mbs!r}{hint if mbs_global is not None else ''}"
            )
        elif not dynamic and mbs_global is not None:
            yield f"set {base}_micro_batch_size_per_gpu only: {base}_micro_batch_size is deprecated (verl refuses both)"
    if lay.actor_dynamic or not _positive(lay.actor_mbs):
        return
    per_rank = lay.mini * lay.n // lay.dp
    if per_rank % lay.actor_mbs:
        yield (
            f"each rank's mini-batch of {per_rank} rollouts ({lay.mini} × {lay.n} / {lay.dp} ranks) is not a multiple of "
            f"{AR}.actor.ppo_micro_batch_size_per_gpu={lay.actor_mbs}; use one of {_divisors(per_rank)}"
        )
    for role, mbs, sp in (("rollout", lay.rollout_mbs, lay.actor_sp), ("ref", lay.ref_mbs, lay.ref_sp)):
        if (role == "ref" and (not lay.use_ref or lay.ref_dynamic)) or not _positive(mbs):
            continue
        ranks = lay.world // sp
        shares = {lay.padded // ranks + (r < lay.padded % ranks) for r in range(ranks)} - {0}
        if any(s % mbs for s in shares):
            yield (
                f"the log-prob pass gives each of {ranks} ranks {sorted(shares)} rollouts, not a multiple of "
                f"{AR}.{role}.log_prob_micro_batch_size_per_gpu={mbs}; use one of "
                f"{_divisors(math.gcd(*shares))}"
            )


def budget_warnings(lay: Layout) -> list[str]:
    """Dynamic token budgets below the longest possible sequence: verl stops at the first longer one."""
    longest = lay.max_prompt + lay.max_response
    out = []
    for role, prefix, dynamic, tokens, sp in (
        ("actor", "ppo", lay.actor_dynamic, lay.actor_tokens, lay.actor_sp),
        ("rollout", "log_prob", lay.rollout_dynamic, lay.rollout_tokens, lay.actor_sp),
        ("ref", "log_prob", lay.ref_dynamic and lay.use_ref, lay.ref_tokens, lay.ref_sp),
    ):
        if dynamic and _positive(tokens) and tokens * sp < longest:
            out.append(
                f"{AR}.{role}.{prefix}_max_token_len_per_gpu={tokens} (× Ulysses {sp}) is below data.max_prompt_length "
                f"+ max_response_length = {lay.max_prompt} + {lay.max_response} = {longest}: the first longer "
                f"sequence stops the run (verl asserts max_token_len >= max_seq_len); set it to >= {longest}"
            )
    return out


def _stderr(message: str) -> None:
    print(f"[vlcal] warning: {message}", file=sys.stderr, flush=True)


def first_problem(lay: Layout) -> str | None:
    """The first rule ``lay`` breaks (meshes, then batch, then micro-batches: the root cause first)."""
    if not lay.fsdp:
        return None
    for rules in (_parallel_rules, _batch_rules, _micro_rules):
        for problem in rules(lay):
            return problem
    return None


def layout_problem(config: Any, warn: Callable[[str], None] | None = _stderr) -> str | None:
    """The first layout verl would assert on mid-run, as one line, or None; token-budget warnings go to
    ``warn``. ``config``: the composed DictConfig (sizes already checked to be positive integers)."""
    try:
        lay = Layout.from_config(config)
    except (TypeError, ValueError) as err:
        return f"a batch or parallel size is not an integer: {err}"
    problem = first_problem(lay)
    if problem is None and warn is not None and lay.fsdp:
        for message in budget_warnings(lay):
            warn(message)
    return problem
