#!/usr/bin/env bash
# The perf suite's core: move 2 MiB KV blocks between two processes over each backend and compare every figure
# with its physical limit measured in the same run (iperf3 and a raw socket loop for TCP, memcpy for shared memory);
# drive a running sidecar over gRPC against the TCP backend; replay Mooncake's conversation trace through the tier
# manager against Belady's MIN and an infinite cache; write and read the SSD tier against fio.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-prereqs.sh
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
dotnet build KvFabric.sln -c Release -nologo -v q
out=${1:-perf/results/core}
mkdir -p "$out"
bench="dotnet perf/bin/Release/net10.0/kvfabric-bench.dll"
$bench transfer --backend tcp --op write --json "$out/tcp-write.json"
$bench transfer --backend tcp --op read --json "$out/tcp-read.json"
$bench transfer --backend shm --op write --json "$out/shm-write.json"
$bench transfer --backend shm --op read --json "$out/shm-read.json"
$bench rpc --json "$out/rpc.json"
trace=../shared/traces/conversation_trace.jsonl
[ -f "$trace" ] || trace=tests/KvFabric.Tests/Tiers/data/conversation_trace_first1500.jsonl  # the slice kept with the tests
$bench replay --trace "$trace" --capacity-blocks 4000 --policy cost --json "$out/replay-cost-4000.json"
$bench tiers --dir perf/bin/demo-ssd --json "$out/tiers-ssd.json"
echo "JSON results in $out/"
