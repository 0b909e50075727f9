#!/usr/bin/env bash
# Installs the system packages KvFabric's tests and perf references need, when they are missing (Debian, as root).
set -euo pipefail
need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)              # the independent hash-spec implementation in the tests
[ -n "$(ldconfig -p 2>/dev/null | grep libxxhash.so.0 || true)" ] || need+=(libxxhash0) # XXH3 checksums
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)                # the TCP reference of the perf suite
# The gRPC interop peers (a grpcio client and server) run on Debian's python3, where these packages install.
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import grpc" >/dev/null 2>&1 || need+=(python3 python3-grpcio)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import grpc_tools" >/dev/null 2>&1 || need+=(python3-grpc-tools)
command -v fio >/dev/null 2>&1 || need+=(fio)                      # the disk reference of `kvfabric-bench tiers`
[ -n "$(ldconfig -p 2>/dev/null | grep libzstd.so.1 || true)" ] || need+=(libzstd1) # the SSD tier's zstd codec
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)  # the remote-KV reference of `kvfabric-bench compare`
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
# The cluster store's etcd tests start their own etcd (loopback, free ports, temp data dir); the package's own service,
# if systemd runs it, is not used by them (docs/cluster.md).
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || need+=(etcd-server)
# The UCX transfer backend (libucp.so.0; its tests fail, not skip, without it) and ucx_perftest, its perf reference
# (in `transfer --backend ucx` and `compare`).
[ -n "$(ldconfig -p 2>/dev/null | grep libucp.so.0 || true)" ] || need+=(libucx0)
command -v ucx_perftest >/dev/null 2>&1 || need+=(ucx-utils)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)      # h2load: a C HTTP/2 client driving `kvfabric-bench rpc`'s Lookup
command -v taskset >/dev/null 2>&1 || need+=(util-linux)        # pins the demo's decode worker to its own CPU
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing: ${need[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
