#!/usr/bin/env bash
# Runs every test on a fresh machine: installs prerequisites, builds, runs the xunit suite (unit, property and
# multi-process tests), then smoke-runs each perf suite command at tiny sizes so the suite never rots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-prereqs.sh
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
# Tests that need root (a real full file system on a small tmpfs) run, and fail without it, instead of skipping.
export KVFABRIC_NO_SKIP=1
dotnet build KvFabric.sln -c Release -warnaserror -nologo -v q

log=$(mktemp)
set +e
dotnet test tests/KvFabric.Tests -c Release --no-build --nologo --blame-hang-timeout 5m 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

echo "== perf smoke (tiny sizes; no figure is asserted)"
bench="dotnet perf/bin/Release/net10.0/kvfabric-bench.dll"
smoke=$(mktemp -d)
for backend in tcp shm; do
  for op in write read; do
    $bench transfer --quick --backend "$backend" --op "$op" --blocks 8 --batch 4 --runs 2 --json "$smoke/transfer-$backend-$op.json" >/dev/null
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['gbps']>0 and r['ratio']>0, r; print('smoke ok:', sys.argv[1].rsplit('/',1)[1], round(r['gbps'],2), 'GB/s')" "$smoke/transfer-$backend-$op.json"
  done
done

for tls in tcp posix,self; do
  $bench transfer --quick --backend ucx --ucx-tls "$tls" --op write --blocks 8 --batch 4 --runs 2 --json "$smoke/transfer-ucx-${tls%%,*}.json" >/dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['gbps']>0 and r['ratio']>0 and r['ucx_transports'], r; print('smoke ok:', sys.argv[1].rsplit('/',1)[1], round(r['gbps'],2), 'GB/s over', r['ucx_transports'])" "$smoke/transfer-ucx-${tls%%,*}.json"
done
$bench transfer --quick --backend ucx --ucx-tls posix,self --ucx-alloc --checksum xxh3 --op write --blocks 8 --batch 4 --runs 2 --json "$smoke/transfer-ucx-alloc.json" >/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['gbps']>0 and r['ucx_alloc'] is True and r['checksum']=='XxHash3', r; print('smoke ok: ucx --ucx-alloc --checksum xxh3', round(r['gbps'],2), 'GB/s')" "$smoke/transfer-ucx-alloc.json"

$bench rpc --quick --blocks 8 --blocks-per-call 4 --callers 8 --lookup-rate 400 --no-reference --json "$smoke/rpc.json" >/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['get_gbps']>0 and r['lookup_calls_per_second']>0 and r['lookup_open_loop_calls_per_second']>200 and r['lookup_h2load_calls_per_second']>0 and r['lookup_h2load_p99_us']>0, r; print('smoke ok: rpc', round(r['get_gbps'],2), 'GB/s get,', round(r['lookup_calls_per_second']), 'lookups/s,', round(r['lookup_open_loop_calls_per_second']), 'open loop,', round(r['lookup_h2load_calls_per_second']), 'from h2load')" "$smoke/rpc.json"
trace=tests/KvFabric.Tests/Tiers/data/conversation_trace_first1500.jsonl
if [ -f "$trace" ]; then
  $bench replay --quick --trace "$trace" --capacity-blocks 200 --policy cost --no-microbench --json "$smoke/replay.json" >/dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert 0 < r['lru_token_hit_rate'] <= r['belady_token_hit_rate'] <= r['infinite_token_hit_rate'] and r['token_hit_rate'] > 0, r; print('smoke ok: replay', r['token_hit_rate'], 'token hit rate')" "$smoke/replay.json"
  $bench route --quick --trace "$trace" --workers 4 --capacity-blocks 1000 --json "$smoke/route.json" >/dev/null
  python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['policies']; assert p['kv-aware']['token_hit_rate'] > p['round-robin']['token_hit_rate'] > 0, p; print('smoke ok: route kv-aware', p['kv-aware']['token_hit_rate'], '> round-robin', p['round-robin']['token_hit_rate'])" "$smoke/route.json"
fi
# etcd and three sidecar processes: index propagation, cross-node Fetch, Route.
$bench cluster --quick --json "$smoke/cluster.json" >/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['fetch_gbps']['median']>0 and r['propagation_p50_ms']>0 and r['route_p50_us']>0, r; print('smoke ok: cluster fetch', round(r['fetch_gbps']['median'],2), 'GB/s over', r['fetch_backend'] + ', propagation p50', r['propagation_p50_ms'], 'ms')" "$smoke/cluster.json"
# On the repository's disk, not /tmp: the tier and fio use O_DIRECT, which tmpfs lacks on older kernels.
$bench tiers --quick --blocks 8 --runs 1 --dir perf/bin/tiers-smoke --json "$smoke/tiers-ssd.json" >/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['ssd_write_gbps']>0 and r['ssd_read_gbps']>0 and r['ratios']['ssd_write_vs_fio']>0, r; print('smoke ok: tiers-ssd.json write', round(r['ssd_write_gbps'],2), 'read', round(r['ssd_read_gbps'],2), 'GB/s')" "$smoke/tiers-ssd.json"

$bench index --quick --scattered --json "$smoke/index.json" >/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['events_per_second']>0 and r['match_p50_us']>0 and r['scattered'] is True and 0<r['bytes_per_block'], r; print('smoke ok: index', round(r['events_per_second']/1e6,2), 'M block events/s, match p50', r['match_p50_us'], 'us')" "$smoke/index.json"

# compare --quick: every reference and KvFabric back to back at tiny sizes (about 1 minute here); ratios exist and are positive.
$bench compare --quick --dir perf/bin/compare-smoke --json "$smoke/compare.json" >/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['ratios']; need=['tcp_vs_iperf3','shm_vs_memcpy','tcp_vs_redis_get','tcp_vs_ucx_perftest','ssd_vs_fio']; assert all(r.get(k,0)>0 for k in need), r; print('smoke ok: compare', {k: r[k] for k in need})" "$smoke/compare.json"
$bench e2e --quick --json "$smoke/e2e.json" >/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['outputs_match'] is True and r['requests']>0 and r['ttft_p50_ms_reuse']>0 and r['ttft_p50_ms_no_reuse']>0 and r['itl_p99_ms_disagg']>0 and r['itl_p99_ms_colocated']>0 and r['itl_p99_ms_decode_alone_paced']>0 and 0<r['handoff_fraction_of_ttft']<1, r; print('smoke ok: e2e', r['requests'], 'requests, outputs match; ttft p50', r['ttft_p50_ms_reuse'], 'vs', r['ttft_p50_ms_no_reuse'], 'ms')" "$smoke/e2e.json"
dotnet src/Workers/bin/Release/net10.0/kvfabric-worker.dll demo --model tiny --requests 6 --prompt-tokens 96 --max-new-tokens 8 --rate 50 --out "$smoke/demo" >/dev/null
python3 -c "import json,sys,os; r=json.load(open(sys.argv[1]+'/summary.json')); assert r['outputs_match'] is True and r['requests']==6 and r['with_reuse']['reused_blocks']>0, r; assert open(sys.argv[1]+'/ttft.svg').read().startswith('<svg'); print('smoke ok: demo', r['requests'], 'requests, outputs match, reuse hit rate', r['with_reuse']['hit_rate'])" "$smoke/demo"
$bench report --results "$smoke" --out "$smoke/report.md" --combined "$smoke/combined.json" >/dev/null
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['suite']=='combined' and 'e2e' in r and 'compare' in r, list(r); print('smoke ok: combined JSON of', len(r)-2, 'results')" "$smoke/combined.json"
python3 -c "import sys,os,re; d=os.path.dirname(sys.argv[1]); t=open(sys.argv[1]).read(); svgs=re.findall(r'\(([\w-]+\.svg)\)', t); assert 'report-transfer.svg' in svgs and 'report-match-latency.svg' in svgs and 'tcp_vs_iperf3' in t, t; assert all(open(os.path.join(d,f)).read().startswith('<svg') for f in svgs); print('smoke ok: report.md with', len(svgs), 'SVG charts')" "$smoke/report.md"
$bench micro --filter '*HostBlockPool*' --iterations 3 --artifacts "$smoke/micro" >/dev/null
grep -q 'HostBlockPool.Rent + Return' "$smoke"/micro/results/*HostBlockPool*-report-github.md && echo "smoke ok: micro (BenchmarkDotNet in process)"

# The plain closing line CI reads: counts from the xunit summary.
summary=$(grep -E '(Passed|Failed)! +- +Failed: +[0-9]+, +Passed: +[0-9]+' "$log" | tail -n 1)
failed=$(sed -E 's/.*Failed: +([0-9]+).*/\1/' <<<"$summary")
passed=$(sed -E 's/.*Passed: +([0-9]+).*/\1/' <<<"$summary")
echo "${passed:-0} passed, ${failed:-0} failed"
exit "$status"
