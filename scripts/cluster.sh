#!/usr/bin/env bash
# Multi-node on one machine: etcd and three sidecars (node-a, node-b, node-c) on loopback ports. Puts a chain on each
# node; shows every node's index matching every chain; routes; fetches node-a's chain on node-c through the transfer
# layer and reads it back byte for byte; kills node-b with SIGKILL and shows it leave the index within its lease.
# Usage: scripts/cluster.sh [lease-ttl-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-prereqs.sh
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
dotnet build KvFabric.sln -c Release -nologo -v q
ttl=${1:-3}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
client_port=$(free_port); peer_port=$(free_port)
etcd_url="http://127.0.0.1:$client_port"
etcd --name kvfabric-demo --data-dir "$work/etcd" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "kvfabric-demo=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  python3 -c "import urllib.request,sys; sys.exit(0 if b'true' in urllib.request.urlopen('$etcd_url/health', timeout=1).read() else 1)" 2>/dev/null && break
  sleep 0.2
done
echo "etcd at $etcd_url"

kvfabric="dotnet src/Fabric/bin/Release/net10.0/kvfabric.dll"
declare -A addr pid
start_node() {
  local node=$1
  KVFABRIC_HOST_CAPACITY=64MiB $kvfabric serve --dev --port 0 --metrics-port -1 --node "$node" --worker "$node-worker" \
    --cluster etcd --etcd "$etcd_url" --lease-ttl "$ttl" >"$work/$node.log" 2>&1 &
  pid[$node]=$!
  pids+=($!)
  for _ in $(seq 300); do
    if line=$(grep -m1 '^READY ' "$work/$node.log"); then
      addr[$node]=$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$line")
      echo "$node serving at ${addr[$node]} (pid ${pid[$node]})"
      return
    fi
    sleep 0.1
  done
  echo "$node did not start:"; cat "$work/$node.log"; exit 1
}
for n in node-a node-b node-c; do start_node "$n"; done

c() { local verb=$1 node=$2; shift 2; $kvfabric client "$verb" --address "${addr[$node]}" "$@"; }
for n in node-a node-b node-c; do c put "$n" --chain "chain-on-$n" --blocks 8; done

echo "== every node's index knows every chain (events travel over SubscribeEvents)"
sleep 1
for asker in node-a node-b node-c; do
  for n in node-a node-b node-c; do echo -n "asked $asker: "; c match "$asker" --chain "chain-on-$n" --blocks 8; done
done
echo "== routing from node-b"
c route node-b --chain chain-on-node-a --blocks 8
echo "== node-c fetches node-a's chain through the transfer layer, then serves it"
c lookup node-c --chain chain-on-node-a --blocks 8
c fetch node-c --chain chain-on-node-a --blocks 8
c get node-c --chain chain-on-node-a --blocks 8

echo "== SIGKILL node-b (lease $ttl s)"
kill -9 "${pid[node-b]}"
start=$(date +%s.%N)
for _ in $(seq 600); do c match node-a --chain chain-on-node-b --blocks 8 | grep -q ' node-b/' || break; sleep 0.05; done
echo "node-b left node-a's index within $(python3 -c "print(round($(date +%s.%N) - $start, 2))") s"
c match node-a --chain chain-on-node-b --blocks 8
c route node-a --chain chain-on-node-b --blocks 8
grep -h "left the cluster" "$work/node-a.log" "$work/node-c.log"
