#!/usr/bin/env bash
# Join this node to a running Ray head:  launch/ray_worker.sh <head-ip>[:6379] [extra `ray start` args]
# Needs the same Python environment, shared storage mounts and auth token (RAY_AUTH_*) as the head.
set -euo pipefail
head="${1:?usage: launch/ray_worker.sh <head-ip>[:port] [ray start args]}"; shift
[[ "$head" == *:* ]] || head="$head:6379"
exec "${VLCAL_RAY:-ray}" start --address "$head" --disable-usage-stats "$@"
