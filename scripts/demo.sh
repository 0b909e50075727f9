#!/usr/bin/env bash
# The main job: a single-machine disaggregated deployment on loopback. Two sidecars hosted by the demo process (nodes of
# an in-process cluster store), two prefill workers and one decode worker as separate `kvfabric-worker serve` processes
# (decode pinned to its own CPU). It replays multi-turn chats over a 90%-shared prefix with prefix reuse and without,
# checks every output against a monolithic run, and prints TTFT / inter-token latency percentiles, the prefix hit rate
# by tier and the bytes moved by backend. summary.json, requests.jsonl and ttft.svg go to demo-out/ (or $1).
# Extra arguments go to `kvfabric-worker demo` (e.g. --trace ../shared/traces/conversation_trace.jsonl --requests 40).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-prereqs.sh
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
dotnet build KvFabric.sln -c Release -nologo -v q
out=${1:-demo-out}
shift || true
dotnet src/Workers/bin/Release/net10.0/kvfabric-worker.dll demo --out "$out" "$@"
