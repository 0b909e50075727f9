using KvFabric.Workers.Reporting;
using Xunit;
using System.Text.Json.Nodes;
using System.Xml.Linq;
using KvFabric.Bench.References;
using KvFabric.Bench.Report;

namespace KvFabric.Tests.Perf;

// The perf suite's parsers of external tools' output and its report writer: pure functions over text, no tools run.
public sealed class BenchReportingTests
{
    [Fact]
    public void RedisCsvWithHeaderGivesRequestsPerSecondByTest()
    {
        const string csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\"\n\"SET\",\"812.35\",\"4.100\",\"1.2\"\n\"GET\",\"1024.00\",\"3.000\",\"0.9\"\n";
        var rps = RedisReference.ParseCsv(csv);
        Assert.Equal(812.35, rps["SET"], 6);
        Assert.Equal(1024.0, rps["GET"], 6);
    }

    [Fact]
    public void RedisCsvWithoutHeaderIsAccepted()
    {
        var rps = RedisReference.ParseCsv("\"SET\",\"10.5\"\r\n\"GET\",\"20\"\r\n");
        Assert.Equal(10.5, rps["SET"], 6);
        Assert.Equal(20, rps["GET"], 6);
    }

    [Fact]
    public void RedisCsvMissingGetThrows() =>
        Assert.Throws<FormatException>(() => RedisReference.ParseCsv("\"test\",\"rps\"\n\"SET\",\"1\"\n"));

    [Fact]
    public void UcxPerftestCsvGivesTheFinalOverallBandwidth()
    {
        // What `ucx_perftest -f -v` printed on this machine (UCX 1.13), with a warning line before it.
        const string output = "[1795359422.7] [vm:1:0] parser.c:1 UCX WARN something\n" +
            "iterations,50.0_percentile_lat,avg_lat,overall_lat,avg_bw,overall_bw,avg_mr,overall_mr\n" +
            " 500,149.438,578.250,578.250,3458.71,3458.71,1729,1729\n";
        Assert.Equal(3458.71, UcxPerftestReference.ParseOverallMBps(output), 6);
    }

    [Fact]
    public void UcxPerftestWithoutCsvThrows() =>
        Assert.Throws<FormatException>(() => UcxPerftestReference.ParseOverallMBps("client failed. connect() failed: Connection refused\n"));

    [Fact]
    public void UcxEnvironmentSetsSegmentsOnlyWhenAsked()
    {
        Assert.Equal(["UCX_TLS=tcp"], UcxPerftestReference.Environment("tcp"));
        Assert.Equal(["UCX_TLS=tcp", "UCX_TCP_TX_SEG_SIZE=2097152", "UCX_TCP_RX_SEG_SIZE=2097152"], UcxPerftestReference.Environment("tcp", 2 << 20));
    }

    [Theory]
    [InlineData(true, false)]
    [InlineData(true, true)]
    [InlineData(false, false)]
    public void ChartIsWellFormedSvgWithOneLinePerSeries(bool logX, bool logY)
    {
        var series = new[]
        {
            new Series("a & b", [(65536, 1.5), (1 << 20, 2.5), (16 << 20, 2.0)]),
            new Series("reference <x>", [(65536, 3.0), (16 << 20, 3.5)], Dashed: true),
        };
        var svg = XDocument.Parse(SvgChart.Line("t", "x", "y", series, logX, logY));
        XNamespace ns = "http://www.w3.org/2000/svg";
        Assert.Equal(2, svg.Descendants(ns + "polyline").Count());
        Assert.Equal(5, svg.Descendants(ns + "circle").Count());
        Assert.Contains(svg.Descendants(ns + "text"), t => t.Value == "a & b");
    }

    [Fact]
    public void ChartWithoutDataSaysSo()
    {
        var svg = XDocument.Parse(SvgChart.Line("t", "x", "y", [new Series("empty", [])], logX: true, logY: false));
        Assert.Contains(svg.Descendants(), e => e.Value == "no data");
    }

    [Fact]
    public void ReportChartsTransferReplayAndIndexFiles()
    {
        string dir = Directory.CreateTempSubdirectory("kvfabric-report-test").FullName;
        try
        {
            foreach (var (bytes, gbps) in new[] { (65536L, 1.0), (2L << 20, 2.0) })
            {
                var t = new JsonObject
                {
                    ["suite"] = "transfer", ["timestamp"] = "2026-11-22T00:00:00Z", ["backend"] = "tcp", ["op"] = "write", ["block_bytes"] = bytes,
                    ["blocks"] = 8, ["streams"] = 1, ["inflight"] = 1, ["repeat"] = 1, ["gbps"] = gbps,
                    ["gbps_spread"] = new JsonObject { ["min"] = gbps, ["max"] = gbps },
                    ["reference"] = new JsonObject { ["tool"] = "iperf3", ["gbps"] = 3.0 }, ["ratio"] = gbps / 3,
                    ["references"] = new JsonObject { ["iperf3"] = new JsonObject { ["gbps"] = 3.0 } },
                };
                File.WriteAllText(Path.Combine(dir, $"transfer-{bytes}.json"), t.ToJsonString());
            }
            var replay = new JsonObject
            {
                ["suite"] = "replay", ["command"] = "kvfabric-bench replay --policy cost", ["policy"] = "cost", ["capacity_blocks"] = new JsonArray(1000),
                ["token_hit_rate"] = 0.1, ["lru_token_hit_rate"] = 0.05, ["belady_token_hit_rate"] = 0.2, ["infinite_token_hit_rate"] = 0.3, ["vs_lru"] = 2.0, ["vs_belady"] = 0.5,
            };
            File.WriteAllText(Path.Combine(dir, "replay.json"), replay.ToJsonString());
            var index = new JsonObject { ["suite"] = "index", ["blocks"] = 100000, ["workers"] = 10, ["prompt_blocks"] = 64, ["match_p50_us"] = 10.0, ["match_p99_us"] = 20.0, ["match_min_us"] = 9.0 };
            File.WriteAllText(Path.Combine(dir, "index.json"), index.ToJsonString());
            File.WriteAllText(Path.Combine(dir, "broken.json"), "{ not json");

            string md = File.ReadAllText(ReportCommand.Write(dir, Path.Combine(dir, "out", "r.md")));

            foreach (string chart in new[] { "r-transfer.svg", "r-hit-rate.svg", "r-match-latency.svg" })
            {
                Assert.Contains($"]({chart})", md, StringComparison.Ordinal);
                XDocument.Parse(File.ReadAllText(Path.Combine(dir, "out", chart)));
            }
            Assert.Contains("| tcp | write | 64KiB |", md, StringComparison.Ordinal);
            Assert.Contains("| replay.json | cost | 1,000 |", md, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
