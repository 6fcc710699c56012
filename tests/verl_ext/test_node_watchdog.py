"""The driver's node watchdog: which nodes it watches and when it gives up (the cluster tests kill a real
node under a running job: tests/cluster/test_cluster_path.py)."""

from __future__ import annotations

import pytest

from vlcal_verl.config import VLCalConfig
from vlcal_verl.verl_ext.node_watchdog import EXIT_NODE_LOST, NodeWatchdog, lost_nodes, start


def node(nid: str, alive: bool = True, ip: str = "10.0.0.1") -> dict:
    return {"NodeID": nid, "Alive": alive, "NodeManagerAddress": ip}


def test_a_node_that_hosted_the_jobs_actors_and_died_is_reported():
    dog = NodeWatchdog(1.0, on_lost=lambda m: None)
    head, gpu1, idle = node("head", ip="10.0.0.1"), node("gpu1", ip="10.0.0.2"), node("idle", ip="10.0.0.3")
    assert dog.observe([head, gpu1, idle], {"head", "gpu1"}) is None
    assert dog.watched == {"head": "10.0.0.1", "gpu1": "10.0.0.2"}
    # an idle node leaving (autoscaler) is not the job's business
    assert dog.observe([head, gpu1, node("idle", alive=False)], {"head", "gpu1"}) is None
    # the state API no longer lists the dead node's actors: it stays watched all the same
    message = dog.observe([head, node("gpu1", alive=False, ip="10.0.0.2")], {"head"})
    assert message is not None and "gpu1 (10.0.0.2)" in message and "head" not in message.split(":")[1]
    assert f"exit {EXIT_NODE_LOST}" in message


def test_a_node_missing_from_the_list_counts_as_dead():
    assert lost_nodes({"a": "1.2.3.4", "b": "1.2.3.5"}, [node("a")]) == ["b (1.2.3.5)"]


def test_actors_placed_later_are_watched_from_then_on():
    dog = NodeWatchdog(1.0, on_lost=lambda m: None)
    assert dog.observe([node("head"), node("w")], {"head"}) is None
    assert dog.observe([node("head"), node("w")], {"head", "w"}) is None
    assert dog.observe([node("head")], {"head"}) is not None


def test_without_the_state_api_every_node_alive_at_the_start_is_watched():
    dog = NodeWatchdog(1.0, on_lost=lambda m: None)
    assert dog.observe([node("head"), node("w"), node("gone", alive=False)], None) is None
    assert set(dog.watched) == {"head", "w"}
    assert dog.observe([node("head"), node("w"), node("late")], None) is None  # joined later: not watched
    assert "w (" in dog.observe([node("head"), node("late")], None)


def test_zero_turns_it_off_and_bad_values_fail_validation():
    assert start(0) is None
    assert VLCalConfig(node_watchdog_s=0).validate().node_watchdog_s == 0
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"vlcal\.node_watchdog_s"):
            VLCalConfig(node_watchdog_s=bad).validate()
