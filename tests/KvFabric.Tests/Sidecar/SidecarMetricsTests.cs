using System.Globalization;
using System.Text.RegularExpressions;
using KvFabric.Rpc;
using KvFabric.Tests.Rpc;
using Xunit;

namespace KvFabric.Tests.Sidecar;

/// <summary>The sidecar's /metrics as Prometheus parses it.</summary>
public sealed partial class SidecarMetricsTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    [GeneratedRegex("""^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*",?)*\})? (\S+)$""")]
    private static partial Regex Sample();

    /// <summary>Checks the text format: every sample typed, no series twice, histograms cumulative up to +Inf = _count. Returns name to type.</summary>
    public static Dictionary<string, string> CheckExposition(string text)
    {
        var types = new Dictionary<string, string>(StringComparer.Ordinal);
        var series = new HashSet<string>(StringComparer.Ordinal);
        var lastBucket = new Dictionary<string, double>(StringComparer.Ordinal);
        foreach (string line in text.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.StartsWith("# TYPE ", StringComparison.Ordinal))
            {
                string[] f = line.Split(' ');
                Assert.True(types.TryAdd(f[2], f[3]), $"two TYPE lines for {f[2]}");
                continue;
            }

            if (line.StartsWith('#'))
                continue;
            Match m = Sample().Match(line);
            Assert.True(m.Success, $"not a sample line: {line}");
            string name = m.Groups[1].Value;
            string family = types.ContainsKey(name) ? name : Regex.Replace(name, "_(bucket|sum|count)$", string.Empty);
            Assert.True(types.ContainsKey(family), $"sample of {name} without a TYPE line before it");
            Assert.True(series.Add(name + m.Groups[2].Value), $"series twice: {line}");
            double value = double.Parse(m.Groups[3].Value.Replace("+Inf", "Infinity", StringComparison.Ordinal), CultureInfo.InvariantCulture);
            if (types[family] == "counter")
                Assert.True(value >= 0, $"negative counter: {line}");
            if (name.EndsWith("_bucket", StringComparison.Ordinal))
            {
                string key = Regex.Replace(m.Groups[2].Value, ",?le=\"[^\"]*\"", string.Empty);
                Assert.True(value >= lastBucket.GetValueOrDefault(family + key), $"buckets not cumulative: {line}");
                lastBucket[family + key] = value;
                if (line.Contains("le=\"+Inf\"", StringComparison.Ordinal))
                    lastBucket[family + key + "+Inf"] = value;
            }
            else if (name.EndsWith("_count", StringComparison.Ordinal) && types[family] == "histogram")
            {
                Assert.Equal(lastBucket[family + m.Groups[2].Value.Replace("{}", string.Empty, StringComparison.Ordinal) + "+Inf"], value);
            }
        }

        return types;
    }

    [Fact]
    public async Task Running_totals_are_typed_counters_and_every_tier_has_hits()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("metrics-types", 2);
        await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 3));
        await client.LookupAsync(TestBlocks.Packed(chain));
        using var http = new HttpClient();
        string text = await http.GetStringAsync($"http://{fx.Host.MetricsEndpoint}/metrics");
        Dictionary<string, string> types = CheckExposition(text);
        // Totals that only grow: typed gauge, rate() and increase() misread a restart's drop to zero as negative traffic.
        Assert.Equal("counter", types["kvfabric_transfer_bytes"]);
        Assert.Equal("counter", types["kvfabric_lookup_blocks"]);
        Assert.Equal("counter", types["kvfabric_tier_hits"]);
        Assert.Equal("gauge", types["kvfabric_tier_used_bytes"]);
        Assert.Contains("kvfabric_tier_hits{tier=\"Host\"} ", text, StringComparison.Ordinal);
        Assert.Contains("kvfabric_lookup_blocks{outcome=\"hit\"} 2", text, StringComparison.Ordinal);
    }

    [Fact]
    public void Label_values_with_quotes_backslashes_and_newlines_stay_one_valid_line()
    {
        var m = new MetricsRegistry();
        m.CreateCounter("x_total", "help with \\ and\nnewline", "tenant").Add(1, "a\"b\\c\nd");
        m.CreateHistogram("y_seconds", "h", [0.5, 0.1, 1], "tenant").Observe(0.3, "q\"");
        m.AddCounter("z", "callback", ["k"], () => [(["v\n"], 3)]);
        string text = m.Render();
        CheckExposition(text);
        Assert.Contains("x_total{tenant=\"a\\\"b\\\\c\\nd\"} 1", text, StringComparison.Ordinal);
        Assert.Contains("# HELP x_total help with \\\\ and\\nnewline\n", text, StringComparison.Ordinal);
        Assert.Contains("y_seconds_bucket{tenant=\"q\\\"\",le=\"0.1\"} 0", text, StringComparison.Ordinal);
        Assert.Contains("y_seconds_bucket{tenant=\"q\\\"\",le=\"0.5\"} 1", text, StringComparison.Ordinal);
        Assert.Contains("# TYPE z counter", text, StringComparison.Ordinal);
    }
}
