#!/usr/bin/env bash
# Start the Ray head on this node (run once per cluster, on the node that will host the driver).
#   launch/ray_head.sh [--port 6379] [--dashboard-port 8265] [--num-gpus N] [extra `ray start` args]
# Env: VLCAL_RAY (ray CLI), RAY_AUTH_MODE/RAY_AUTH_TOKEN (token auth; recommended on shared networks:
#      `ray get-auth-token --generate` once, then distribute ~/.ray/auth_token or export RAY_AUTH_TOKEN).
# The dashboard (job API) listens on 0.0.0.0 so `launch/submit.sh --address http://<head>:8265` works from a
# login node; restrict it with --dashboard-host if the network is not trusted.
set -euo pipefail
port=6379 dash=8265 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --dashboard-port) dash="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
exec "${VLCAL_RAY:-ray}" start --head --port "$port" --dashboard-host 0.0.0.0 --dashboard-port "$dash" \
  --disable-usage-stats "${extra[@]}"
