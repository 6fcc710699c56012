"""The reward server's HTTP routes (FastAPI).

Stateless: every request carries what it needs (responses, ground truths, optional weights), so
replicas behind a load balancer are interchangeable. The event loop only parses JSON, parses responses
and does reward arithmetic; grading runs in the process pool of :mod:`reward_server.scoring`, awaited
through ``asyncio.wrap_future``. Overload is refused early (503 + Retry-After) instead of queueing
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import reward_server
from reward_server import openrlhf, schemas, visual
from reward_server.limits import (
    ApiError,
    BodyLimitMiddleware,
    JsonContentTypeMiddleware,
    MetricsMiddleware,
    api_error_handler,
    http_error_handler,
    internal_error_handler,
    validation_error_handler,
)
from reward_server.metrics import ServerMetrics
from reward_server.scoring import ScoringService
from reward_server.settings import ServerSettings
from reward_server.shutdown import Drain
from vlcal_verl.config import RewardConfig

ROUTES = {"/v1/score", "/v1/visual-labels", "/get_reward", "/healthz", "/readyz", "/metrics", "/v1/info"}


def create_app(settings: ServerSettings | None = None) -> Any:
    """Build the ASGI app (FastAPI wrapped in the body-limit and metrics middleware)."""
    settings = (settings or ServerSettings()).validate()
    metrics = ServerMetrics.create()
    service = ScoringService(settings, metrics)
    drain = Drain(settings.shutdown_grace_s, settings.retry_after_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        warm = asyncio.create_task(service.warm(also=visual.warm_up))
        try:
            yield
        finally:
            warm.cancel()
            service.close()

    app = FastAPI(title="vlcal reward server", version=reward_server.__version__, lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, service
    app.state.drain = drain  # started by reward_server.shutdown.DrainingServer on SIGTERM
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
    _add_scoring_routes(app, settings, service, drain)
    _add_ops_routes(app, settings, metrics, service, drain)
    wrapped = JsonContentTypeMiddleware(BodyLimitMiddleware(app, settings.max_body_bytes))
    outer = MetricsMiddleware(wrapped, metrics, ROUTES)
    outer.fastapi = app  # type: ignore[attr-defined]  # reachable for tests and introspection
    return outer


def _reward_config(settings: ServerSettings, weights: schemas.Weights | None) -> RewardConfig:
    cfg = settings.reward_config()
    if weights is None:
        return cfg
    overrides = {k: v for k, v in weights.model_dump().items() if v is not None}
    return replace(cfg, **overrides)


def _check_items(settings: ServerSettings, n: int, field: str) -> None:
    if n > settings.max_items:
        msg = f"{field}: {n} items; the limit is max_items={settings.max_items} per request"
        raise ApiError(413, ["body", field], msg, "too_many_items")


def _check_responses(settings: ServerSettings, texts: list[str], field: str, sub: str | None) -> None:
    limit = settings.max_response_chars
    for i, text in enumerate(texts):
        if len(text) > limit:
            loc = ["body", field, i] + ([sub] if sub else [])
            name = f"{field}[{i}]" + (f".{sub}" if sub else "")
            msg = f"{name}: {len(text)} characters; the limit is max_response_chars={limit}"
            raise ApiError(413, loc, msg, "response_too_large")


def _check_reward(spec: schemas.RewardSpec | None) -> None:
    if spec is None:
        return
    if spec.name not in (reward_server.REWARD_NAME, "vlcal"):
        msg = f"this server serves reward {reward_server.REWARD_NAME!r}, not {spec.name!r}"
        raise ApiError(422, ["body", "reward", "name"], msg, "unknown_reward")
    if spec.version is not None and spec.version != reward_server.REWARD_VERSION:
        msg = f"this server serves reward version {reward_server.REWARD_VERSION!r}, not {spec.version!r}"
        raise ApiError(422, ["body", "reward", "version"], msg, "reward_version_mismatch")


def _reward_info(cfg: RewardConfig) -> schemas.RewardInfo:
    weights = {
        "w_brier": cfg.w_brier,
        "w_fmt": cfg.w_fmt,
        "w_vis": cfg.w_vis,
        "protocol": cfg.protocol,
        "reference_parity": cfg.reference_parity,
    }
    return schemas.RewardInfo(
        name=reward_server.REWARD_NAME, version=reward_server.REWARD_VERSION, weights=weights
    )


def _add_scoring_routes(
    app: FastAPI, settings: ServerSettings, service: ScoringService, drain: Drain
) -> None:
    @app.post("/v1/score", response_model=schemas.ScoreResponse)
    async def score(request: schemas.ScoreRequest) -> schemas.ScoreResponse:
        start = time.perf_counter()
        drain.refuse_if_draining()
        _check_reward(request.reward)
        _check_items(settings, len(request.items), "items")
        _check_responses(settings, [it.response for it in request.items], "items", "response")
        cfg = _reward_config(settings, request.weights)
        async with service.admit(len(request.items)):
            results = await drain.finish(service.score(request.items, cfg))
        drain.refuse_worker_errors([r.status for r in results])
        return schemas.ScoreResponse(
            results=results,
            reward=_reward_info(cfg),
            n_items=len(results),
            latency_ms=(time.perf_counter() - start) * 1e3,
        )

    @app.post("/get_reward", response_model=schemas.OpenRLHFResponse)
    async def get_reward(request: schemas.OpenRLHFRequest) -> schemas.OpenRLHFResponse:
        drain.refuse_if_draining()
        _check_items(settings, len(request.query), "query")
        _check_responses(settings, request.query, "query", None)
        items, methods = openrlhf.to_items(request)
        async with service.admit(len(items)):
            results = await drain.finish(service.score(items, settings.reward_config()))
        drain.refuse_worker_errors([r.status for r in results])
        for method in methods:
            service.metrics.get_reward_splits.labels(method=method).inc()
        return openrlhf.to_response(results, methods)

    @app.post("/v1/visual-labels", response_model=schemas.VisualLabelResponse)
    async def visual_labels(request: schemas.VisualLabelRequest) -> schemas.VisualLabelResponse:
        drain.refuse_if_draining()
        _check_items(settings, len(request.samples), "samples")
        return await drain.finish(asyncio.to_thread(visual.visual_labels, request))


def _add_ops_routes(
    app: FastAPI, settings: ServerSettings, metrics: ServerMetrics, service: ScoringService, drain: Drain
) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": reward_server.__version__}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if drain.draining:
            return JSONResponse(
                {"ready": False, "reason": "shutting down"},
                status_code=503,
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        if service.ready:
            return JSONResponse({"ready": True, "workers": settings.workers})
        return JSONResponse(
            {"ready": False, "reason": service.not_ready_reason()},
            status_code=503,
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        limits = {
            k: getattr(settings, k)
            for k in ("max_items", "max_body_bytes", "max_inflight", "max_response_chars", "timeout")
        }
        return {
            "server_version": reward_server.__version__,
            "reward": _reward_info(settings.reward_config()).model_dump(),
            "component_keys": list(service.component_keys),
            "limits": limits,
            "workers": settings.workers,
            "ready": service.ready,
            "routes": sorted(ROUTES),
        }
