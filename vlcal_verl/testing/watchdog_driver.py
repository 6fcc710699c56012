"""Test-only: a Ray driver that waits forever on work placed on one node, under the node watchdog.

``python -m vlcal_verl.testing.watchdog_driver <gcs address> <node id> <ready file>`` starts the
watchdog (:mod:`vlcal_verl.verl_ext.node_watchdog`, checking every second) as ``python -m vlcal_verl.main``
does, joins the cluster, places an actor on ``<node id>``, touches ``<ready file>`` once the watchdog
watches that node, then waits on nothing that will ever finish — as verl's agent loop waited on a lost
node's requests. The test kills the node's raylet; the watchdog must end this process with exit 3.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from vlcal_verl.verl_ext import node_watchdog

    address, node_id, ready = argv
    dog = node_watchdog.start(1.0)
    ray.init(address=address, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Placed:
        def ping(self) -> int:
            return 1

    actor = Placed.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    ray.get(actor.ping.remote(), timeout=120)
    deadline = time.monotonic() + 60
    while node_id not in dog.watched:
        if time.monotonic() > deadline:
            raise SystemExit(f"the watchdog never watched {node_id}: {dog.watched}")
        time.sleep(0.2)
    Path(ready).touch()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1:])
