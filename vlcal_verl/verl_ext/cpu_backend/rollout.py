"""verl rollout ``"hf"``: a Hugging Face ``generate`` server for verl's V1 agent loop, for CPU-only runs.

verl 0.9.1 generates rollouts only through token-in/token-out *servers* (vLLM, SGLang, TRT-LLM): the
agent loop calls ``server_handle.generate.remote(prompt_ids, sampling_params, request_id, image_data=...)``
and expects a :class:`~verl.workers.rollout.replica.TokenOutput`. None of those engines runs on a
2-core CPU box, so this module provides the same three pieces with ``transformers`` instead:

- :class:`HFRolloutServer` — the server (a Ray actor, like ``vLLMHttpServer``): holds its own copy of
  the HF model and serves ``generate`` with verl's vLLM signature, the same ``max_tokens`` defaults,
  ``stop_reason`` values, ``extra_fields["global_steps"]``, abort/resume gate and no-op sleep/wake-up.
- :class:`HFReplica` — the ``RolloutReplica`` that launches one server per replica (registered with
  ``RolloutReplicaRegistry`` as ``"hf"``; looked up by ``LLMServerManager`` in the trainer process).
- :class:`HFServerAdapter` — the ``BaseRollout`` the hybrid ``ActorRolloutRefWorker`` builds with
  ``get_rollout_class("hf", "async")`` (looked up in each *worker* process). It pushes the actor's
  weights to its replica's server after every update.

Design (hybrid mode, the V1 sync trainer's mode). vLLM's hybrid server shares the GPU with the FSDP
worker and receives weights over ZMQ/CUDA IPC; on CPU there is no memory to share, so the server is a
separate Ray actor on the worker's node with its own model copy (tiny models: megabytes), and weights
travel as Ray calls: the trainer's ``checkpoint_manager.update_weights`` → ``worker.update_weights(
mode="naive")`` → ``HFServerAdapter.update_weights(engine.get_per_tensor_param())`` → buckets of
``checkpoint_engine.update_weights_bucket_megabytes`` → ``server.load_weights.remote``. Every rank
iterates the generator (FSDP's ``full_tensor()`` is a collective); only a replica's first rank sends.
With ``tensor_model_parallel_size=1`` each FSDP rank gets its own replica (two servers on two ranks,
generating in parallel); a larger size makes one server span that many ranks. TP is not real: the
server always runs the whole model in one process.

Log-probs: the actor recomputes ``log_softmax(logits / temperature)`` over the full vocabulary (no
top-k/top-p, no token bans), so the server returns exactly that for each sampled token — the raw
logits as the model emits them (after the repetition penalty only when one is set), temperature 1 for
greedy (vLLM's convention). Vision placeholder/marker tokens are banned from sampling: the k-th run of
``<|image_pad|>`` must pair with the k-th image, and a sampled one crashes ``get_rope_index``.

Prompt images: verl's agent loop builds ``prompt_ids`` through the processor, so image/video pads are
already expanded; the server re-runs the processor on the media alone (``pixel_values``,
``image_grid_thw``), checks the pad counts agree (expanding single collapsed pads if a caller sent
vLLM-style ids) and derives ``mm_token_type_ids`` the way the agent loop does for transformers 5.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any

import ray
import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput

from vlcal_verl.verl_ext.cpu_backend.hf_engine import HFGenerationEngine, load_hf_model
from vlcal_verl.verl_ext.cpu_backend.hf_inputs import resolve_sampling

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"
ROLLOUT_MODE = "async"  # RolloutConfig accepts only "async" (verl/workers/config/rollout.py:286)
ADAPTER_FQDN = f"{__name__}.HFServerAdapter"
# ----------------------------------------------------------------------------------------------------
# the server (a Ray actor in a run; a plain object in unit tests)
# ----------------------------------------------------------------------------------------------------


class HFRolloutServer:
    """Token-in/token-out HF server with the methods verl calls on ``vLLMHttpServer``.

    Sleep/wake-up/KV-cache calls are no-ops: HF ``generate`` keeps no cache between requests and CPU
    memory holds both model copies. Abort is real: in-flight requests stop at the next token and
    return ``stop_reason="aborted"``; new ones wait behind a closed gate until ``resume_generation``
    (or are rejected when ``reject_request=True``), as in vLLM's server.
    """

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        rollout_mode: RolloutMode = RolloutMode.HYBRID,
        replica_rank: int = 0,
        node_rank: int = 0,
        server_name: str = "",
    ) -> None:
        from verl.utils.torch_dtypes import PrecisionType
        from verl.workers.rollout.utils import get_max_position_embeddings

        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        # the config's own class when it names one (``_target_``: this package's VLCalModelConfig builds
        # InternVL's processor, which verl's HFModelConfig leaves None); verl's HFModelConfig otherwise
        has_target = not isinstance(model_config, HFModelConfig) and "_target_" in model_config
        self.model_config: HFModelConfig = omega_conf_to_dataclass(
            model_config, dataclass_type=None if has_target else HFModelConfig
        )
        max_len = get_max_position_embeddings(self.model_config.hf_config)
        if self.config.max_model_len is None or self.config.max_model_len > max_len:
            self.config.max_model_len = max_len
        self.rollout_mode, self.replica_rank, self.node_rank = rollout_mode, replica_rank, node_rank
        self.server_name = server_name or f"{ROLLOUT_NAME}_server_{replica_rank}_{node_rank}"
        hf_kwargs = dict(self.config.engine_kwargs.get(ROLLOUT_NAME, None) or {})
        if hf_kwargs.get("num_threads"):
            torch.set_num_threads(int(hf_kwargs["num_threads"]))
        model = load_hf_model(
            self.model_config,
            PrecisionType.to_dtype(self.config.dtype),
            self.config.load_format,
            hf_kwargs.get("attn_implementation", "sdpa"),
        )
        self.engine = HFGenerationEngine(model, self.model_config, seed=self.config.seed + replica_rank)
        self.global_steps: int | None = None
        self._arrivals: collections.Counter = collections.Counter()  # (request id, prompt) this version
        self._arrivals_version: int | None = None
        self._inflight = 0
        self._resume = asyncio.Event()
        self._resume.set()
        self._rejecting = False

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        priority: int = 0,
        kv_transfer_params: dict | None = None,
    ) -> TokenOutput:
        """Generate one response (``vLLMHttpServer.generate``'s signature); see :class:`TokenOutput`."""
        from verl.utils.tokenizer import normalize_token_ids

        if audio_data is not None or kv_transfer_params is not None:
            raise NotImplementedError("hf rollout: audio and PD KV transfer are not supported")
        prompt_ids = normalize_token_ids(prompt_ids)
        spec = resolve_sampling(
            sampling_params, self.config, len(prompt_ids), self._seed_key(request_id, prompt_ids), prompt_ids
        )
        while not self._resume.is_set():
            if self._rejecting:
                return self._aborted()
            await self._resume.wait()
        self._inflight += 1
        try:
            token_ids, log_probs, aborted = await asyncio.to_thread(
                self.engine.generate, prompt_ids, spec, image_data, video_data, mm_processor_kwargs
            )
        finally:
            self._inflight -= 1
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if spec.logprobs else None,
            stop_reason="aborted" if aborted else "completed",
            num_preempted=0,
            extra_fields={"global_steps": self.global_steps, "num_cached_tokens": 0},
        )

    def _seed_key(self, request_id: str, prompt_ids: list[int]) -> str:
        """``<request id>#<k>``: the k-th arrival of this request id with this prompt since the weights'
        version changed. verl's TransferQueue loop names every request ``det-0`` under full determinism
        and the ``n`` copies of a prompt are identical requests, so the arrival count is what tells them
        apart; which copy arrives first only permutes the group (GRPO's statistics do not change)."""
        if not self.config.full_determinism:
            return request_id
        if self._arrivals_version != self.global_steps:
            self._arrivals.clear()
            self._arrivals_version = self.global_steps
        key = (request_id, tuple(prompt_ids))
        k = self._arrivals[key]
        self._arrivals[key] += 1
        return f"{request_id}#{k}"

    def _aborted(self) -> TokenOutput:
        return TokenOutput(
            token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps}
        )

    # --- weights (called by HFServerAdapter) ---------------------------------------------------

    async def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    async def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of full tensors; returns how many were written."""
        return await asyncio.to_thread(self.engine.load_weights, named_tensors)

    async def finish_weight_update(self, global_steps: int | None = None) -> list[str]:
        """Record the weights' version; return (and log) parameters the update did not cover."""
        missing = self.engine.missing_weights()
        if missing:
            logger.warning(
                "hf rollout %s: %d parameters not updated, e.g. %s",
                self.server_name,
                len(missing),
                missing[:3],
            )
        if global_steps is not None:
            self.global_steps = global_steps
        return missing

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # --- control plane (the names verl calls on its servers) -------------------------------------

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Stop in-flight requests at their next token and close the gate; wait for them to drain."""
        self._resume.clear()
        self._rejecting = reject_request
        aborted = self._inflight
        self.engine.abort_event.set()
        while self._inflight > 0:
            await asyncio.sleep(0.01)
        return {"aborted_count": aborted, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": False, "request_id": request_id, "error": "hf rollout aborts only all requests"}

    async def resume_generation(self) -> None:
        self.engine.abort_event.clear()
        self._rejecting = False
        self._resume.set()

    async def resume_engine_generation(self) -> None:
        self.engine.abort_event.clear()

    async def open_submission_gate(self) -> None:
        self._rejecting = False
        self._resume.set()

    async def wait_for_requests_to_drain(self) -> None:
        while self._inflight > 0:
            await asyncio.sleep(0.01)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    def get_server_address(self) -> tuple[str, None]:
        return f"{ROLLOUT_NAME}://{self.server_name}", None

    def get_rollout_config(self) -> RolloutConfig:
        return self.config


# ----------------------------------------------------------------------------------------------------
# replica (trainer process) and adapter (worker process)
# ----------------------------------------------------------------------------------------------------


def server_actor_name(
    replica_rank: int, prefix: str = f"{ROLLOUT_NAME}_", kind: str = "", suffix: str = ""
) -> str:
    """``hf_server_<replica>_0``: vLLM's naming (``ServerAdapter`` finds its server by this name)."""
    return f"{prefix}server_{kind}{replica_rank}_0{suffix}"


class HFReplica(RolloutReplica):
    """One :class:`HFRolloutServer` actor per replica, on the node of the replica's first worker.

    The actor asks for no CPU or GPU (the FSDP workers hold the node's logical GPUs and the CPUs are
    the machine's only compute; generation and training never overlap in the sync trainer).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(HFRolloutServer)

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        kind = "reward_" if self.is_reward_model else "teacher_" if self.is_teacher_model else ""
        name = server_actor_name(self.replica_rank, kind=kind, suffix=self.name_suffix)
        options: dict[str, Any] = {
            "name": name,
            "max_concurrency": self.max_concurrency,
            "num_cpus": 0,
            "num_gpus": 0,
        }
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(
                lambda self: ray.get_runtime_context().get_node_id()
            )
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        server = self.server_class.options(**options).remote(
            config=self.config,
            model_config=self.model_config,
            rollout_mode=self.rollout_mode,
            replica_rank=self.replica_rank,
            node_rank=0,
            server_name=name,
        )
        address, _ = await server.get_server_address.remote()  # also waits for the model to load
        self.servers = [server]
        self._server_handle = server
        self._server_address = address

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        results = await asyncio.gather(
            *[s.abort_all_requests.remote(reject_request=reject_request) for s in self.servers]
        )
        return {
            "aborted_count": sum(r["aborted_count"] for r in results),
            "request_ids": [],
            "server_results": results,
        }

    async def abort_request(self, request_id: str) -> dict[str, Any]:
        return await self.servers[0].abort_request.remote(request_id)


class HFServerAdapter(BaseRollout):
    """The hybrid worker's handle on its replica's :class:`HFRolloutServer` (``vLLM ServerAdapter``'s role).

    Built by ``ActorRolloutRefWorker.init_model`` in every worker; the replica's first rank
    (``rollout_rank == 0``) talks to the server, found lazily by actor name (servers start after the
    workers).
    """

    def __init__(
        self,
        config: RolloutConfig,
        model_config: HFModelConfig,
        device_mesh: Any = None,
        replica_rank: int = -1,
    ) -> None:
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % size
        self.server_handle: Any = None

    @property
    def is_leader_rank(self) -> bool:
        return self.rollout_rank == 0

    def _server(self) -> Any:
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_actor_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]) -> None:
        if self.config.free_cache_engine and self.is_leader_rank:
            await self._server().wake_up.remote(tags=tags)

    async def release(self) -> None:
        if self.config.free_cache_engine and self.is_leader_rank:
            await self._server().sleep.remote()

    async def update_weights(
        self,
        weights: Any,
        global_steps: int | None = None,
        wire_format: str = "named_tensors",
        **kwargs: Any,
    ) -> None:
        """Stream ``(name, full tensor)`` pairs to the server in buckets; every rank drains ``weights``.

        ``weights`` may be a sync or async iterable; each bucket holds at most
        ``checkpoint_engine.update_weights_bucket_megabytes`` (one larger tensor goes alone).
        """
        from verl.workers.rollout.utils import ensure_async_iterator

        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout: wire_format {wire_format!r} (only 'named_tensors')")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError(
                "hf rollout: LoRA adapters are not supported; set model.lora.merge=True"
            )
        start = time.time()
        server = self._server() if self.is_leader_rank else None
        limit = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        if server is not None:
            await server.begin_weight_update.remote()
        async for name, tensor in ensure_async_iterator(weights):
            if server is None:
                continue  # still iterate: FSDP's full_tensor() is a collective every rank joins
            t = tensor.detach().to("cpu").contiguous()
            if bucket and size + t.nbytes > limit:
                await server.load_weights.remote(bucket)
                bucket, size = [], 0
            bucket.append((name, t))
            size += t.nbytes
        if server is not None:
            if bucket:
                await server.load_weights.remote(bucket)
            await server.finish_weight_update.remote(global_steps)
            logger.info(
                "hf rollout replica %d: weights updated in %.2fs", self.replica_rank, time.time() - start
            )

    def generate_sequences(self, prompts: Any) -> Any:
        raise NotImplementedError("hf rollout is server-only: generation goes through the agent loop")


# ----------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------


def _load_replica() -> type[RolloutReplica]:
    return HFReplica


def register_rollout() -> str:
    """Register rollout ``"hf"`` in verl's two rollout registries (idempotent); return the name.

    - ``RolloutReplicaRegistry`` (trainer / task-runner process: ``LLMServerManager`` resolves
      ``rollout.name`` there) gets a loader for :class:`HFReplica`.
    - ``_ROLLOUT_REGISTRY`` (worker processes: ``ActorRolloutRefWorker.init_model`` and
      ``CheckpointEngineWorker`` call ``get_rollout_class(name, mode)``) gets the adapter's import
      path. verl 0.9.1 has no register function for it (``verl/workers/rollout/base.py``: a module
      dict read by ``get_rollout_class``); adding a key is the least invasive hook — patching
      ``get_rollout_class`` would need every ``from ... import get_rollout_class`` site patched too.

    Call it in every process (driver, task runner, Ray workers); it is cheap after the first call.
    """
    from verl.workers.rollout import base, replica

    if replica.RolloutReplicaRegistry._registry.get(ROLLOUT_NAME) is not _load_replica:
        replica.RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, ROLLOUT_MODE)] = ADAPTER_FQDN
    return ROLLOUT_NAME
