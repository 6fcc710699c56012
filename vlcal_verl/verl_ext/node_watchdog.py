"""Fail the job when a node running its actors dies, instead of waiting on it forever.

verl 0.9.1's agent loop awaits the rollout servers' replies; when the node of a server is lost mid-step
(its raylet killed, the machine preempted), those awaits never return and the job hangs (measured on the
two-node test cluster: ``pending: 0, running: 4`` for more than 6 minutes, nothing logged). The
watchdog runs in the driver (``python -m vlcal_verl.main``) as a daemon thread: every ``interval_s`` it
asks Ray which nodes host this job's actors (state API) and which nodes are alive (``ray.nodes()``); once a
node that hosted them is gone it prints one line naming the node and exits the driver with
:data:`EXIT_NODE_LOST`. Ray then ends the job FAILED and stops the job's actors; resubmitting resumes from
the last complete checkpoint. ``vlcal.node_watchdog_s: 0`` turns it off.

Without the state API (a Ray started without its dashboard) it watches every node alive when it started.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_NODE_LOST = 3


def actor_nodes(job_id: str) -> set[str] | None:
    """Node ids hosting this job's live actors; None when Ray's state API cannot answer."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("job_id", "=", job_id), ("state", "=", "ALIVE")], limit=10_000)
    except Exception:
        return None
    return {a.node_id for a in actors if a.node_id}


def lost_nodes(watched: dict[str, str], nodes: list[dict[str, Any]]) -> list[str]:
    """``"<id> (<address>)"`` of every watched node (id → address) that ``ray.nodes()`` no longer shows
    alive."""
    alive = {n["NodeID"] for n in nodes if n.get("Alive")}
    return [f"{nid} ({addr})" for nid, addr in sorted(watched.items()) if nid not in alive]


def _exit(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_NODE_LOST)


class NodeWatchdog(threading.Thread):
    """The daemon thread (module docstring); ``on_lost`` gets the message (default: print it and exit)."""

    def __init__(self, interval_s: float, on_lost: Callable[[str], None] = _exit) -> None:
        super().__init__(name="vlcal-node-watchdog", daemon=True)
        self.interval_s = interval_s
        self.on_lost = on_lost
        self.watched: dict[str, str] = {}

    def observe(self, nodes: list[dict[str, Any]], hosts: set[str] | None) -> str | None:
        """One check: ``nodes`` as ``ray.nodes()`` lists them, ``hosts`` the node ids of the job's live
        actors (None: the state API did not answer). Returns the message when a watched node is gone."""
        address = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes if n.get("Alive")}
        if hosts is None and not self.watched:
            hosts = set(address)
        for nid in hosts or ():
            if nid in address:
                self.watched.setdefault(nid, address[nid])
        lost = lost_nodes(self.watched, nodes)
        if not lost:
            return None
        return (
            f"[vlcal] node lost: {', '.join(lost)} ran this job's actors and is gone; stopping the job "
            f"(exit {EXIT_NODE_LOST}) instead of waiting on its requests — resubmit to resume from the last "
            "complete checkpoint"
        )

    def run(self) -> None:
        import ray

        while not ray.is_initialized():  # verl's run_ppo connects after the thread starts
            time.sleep(0.2)
        job_id = ray.get_runtime_context().get_job_id()
        while True:
            message = self.observe(ray.nodes(), actor_nodes(job_id))
            if message:
                self.on_lost(message)
                return
            time.sleep(self.interval_s)


def start(interval_s: float) -> NodeWatchdog | None:
    """Start the watchdog (``interval_s`` > 0); return it, or None when off."""
    if interval_s <= 0:
        return None
    dog = NodeWatchdog(interval_s)
    dog.start()
    return dog
