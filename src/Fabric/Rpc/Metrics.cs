using System.Collections.Concurrent;
using System.Globalization;
using System.Text;

namespace KvFabric.Rpc;

/// <summary>
/// A small Prometheus registry (text exposition format 0.0.4): labelled counters, histograms with fixed buckets, and
/// gauges read at scrape time. Recording is lock-free after a label set was first seen.
/// </summary>
public sealed class MetricsRegistry
{
    private readonly ConcurrentDictionary<string, Family> _families = new(StringComparer.Ordinal);

    public Counter CreateCounter(string name, string help, params string[] labelNames) =>
        (Counter)_families.GetOrAdd(name, n => new Counter(n, help, labelNames));

    public Histogram CreateHistogram(string name, string help, double[] buckets, params string[] labelNames) =>
        (Histogram)_families.GetOrAdd(name, n => new Histogram(n, help, buckets, labelNames));

    /// <summary>A gauge whose samples are read when scraped: each sample is (label values, value).</summary>
    public void AddGauge(string name, string help, string[] labelNames, Func<IEnumerable<(string[] Labels, double Value)>> read) =>
        _families[name] = new GaugeFamily(name, help, labelNames, read);

    /// <summary>
    /// A counter whose samples are read when scraped (a running total kept elsewhere, e.g. bytes an agent moved): typed
    /// counter so that rate() and increase() treat a restart's drop to zero as a reset. Each value must never decrease.
    /// </summary>
    public void AddCounter(string name, string help, string[] labelNames, Func<IEnumerable<(string[] Labels, double Value)>> read) =>
        _families[name] = new GaugeFamily(name, help, labelNames, read, "counter");

    public string Render()
    {
        var sb = new StringBuilder(4096);
        foreach (Family f in _families.Values.OrderBy(f => f.Name, StringComparer.Ordinal))
            f.Render(sb);
        return sb.ToString();
    }

    public abstract class Family(string name, string help, string type, string[] labelNames)
    {
        public string Name { get; } = name;
        protected string[] LabelNames { get; } = labelNames;

        internal void Render(StringBuilder sb)
        {
            sb.Append("# HELP ").Append(Name).Append(' ').Append(help.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\n", "\\n", StringComparison.Ordinal)).Append('\n');
            sb.Append("# TYPE ").Append(Name).Append(' ').Append(type).Append('\n');
            RenderSamples(sb);
        }

        protected abstract void RenderSamples(StringBuilder sb);

        protected void AppendLabels(StringBuilder sb, string[] values, string? extraName = null, string? extraValue = null)
        {
            if (values.Length == 0 && extraName is null)
                return;
            sb.Append('{');
            for (int i = 0; i < values.Length; i++)
            {
                if (i > 0)
                    sb.Append(',');
                sb.Append(LabelNames[i]).Append("=\"").Append(Escape(values[i])).Append('"');
            }

            if (extraName is not null)
                sb.Append(values.Length > 0 ? "," : string.Empty).Append(extraName).Append("=\"").Append(extraValue).Append('"');
            sb.Append('}');
        }

        protected static string Format(double v) =>
            double.IsPositiveInfinity(v) ? "+Inf" : v.ToString("R", CultureInfo.InvariantCulture);

        private static string Escape(string v) =>
            v.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\"", "\\\"", StringComparison.Ordinal).Replace("\n", "\\n", StringComparison.Ordinal);

        protected string Key(string[] values)
        {
            if (values.Length != LabelNames.Length)
                throw new ArgumentException($"{Name} has labels ({string.Join(',', LabelNames)}); got {values.Length} values");
            return string.Join('\u0001', values);
        }
    }

    public sealed class Counter(string name, string help, string[] labelNames) : Family(name, help, "counter", labelNames)
    {
        private readonly ConcurrentDictionary<string, (string[] Labels, StrongBox Box)> _series = new(StringComparer.Ordinal);

        public void Add(double value, params string[] labels) => WithLabels(labels).Add(value);

        /// <summary>The series of one label set, to keep and add to without looking it up again (hot paths).</summary>
        public StrongBox WithLabels(params string[] labels) => _series.GetOrAdd(Key(labels), _ => (labels, new StrongBox())).Box;

        public double Get(params string[] labels) => _series.TryGetValue(Key(labels), out var s) ? s.Box.Value : 0;

        protected override void RenderSamples(StringBuilder sb)
        {
            foreach (var (labels, box) in _series.Values)
            {
                sb.Append(Name);
                AppendLabels(sb, labels);
                sb.Append(' ').Append(Format(box.Value)).Append('\n');
            }
        }
    }

    public sealed class Histogram : Family
    {
        private readonly double[] _buckets;
        private readonly ConcurrentDictionary<string, (string[] Labels, Series Series)> _series = new(StringComparer.Ordinal);

        internal Histogram(string name, string help, double[] buckets, string[] labelNames) : base(name, help, "histogram", labelNames)
        {
            _buckets = buckets.Order().ToArray();
        }

        private sealed class Series(int buckets)
        {
            public readonly long[] Counts = new long[buckets + 1];
            public double Sum;
            public long Count;
        }

        public void Observe(double value, params string[] labels) => Observe(WithLabels(labels), value);

        /// <summary>The series of one label set, to keep and observe into without looking it up again (hot paths).</summary>
        public object WithLabels(params string[] labels) => _series.GetOrAdd(Key(labels), _ => (labels, new Series(_buckets.Length))).Series;

        public void Observe(object series, double value)
        {
            var s = (Series)series;
            int i = 0;
            while (i < _buckets.Length && value > _buckets[i])
                i++;
            lock (s)
            {
                s.Counts[i]++;
                s.Sum += value;
                s.Count++;
            }
        }

        protected override void RenderSamples(StringBuilder sb)
        {
            foreach (var (labels, s) in _series.Values)
            {
                long cumulative = 0;
                lock (s)
                {
                    for (int i = 0; i <= _buckets.Length; i++)
                    {
                        cumulative += s.Counts[i];
                        sb.Append(Name).Append("_bucket");
                        AppendLabels(sb, labels, "le", i < _buckets.Length ? Format(_buckets[i]) : "+Inf");
                        sb.Append(' ').Append(cumulative).Append('\n');
                    }

                    sb.Append(Name).Append("_sum");
                    AppendLabels(sb, labels);
                    sb.Append(' ').Append(Format(s.Sum)).Append('\n');
                    sb.Append(Name).Append("_count");
                    AppendLabels(sb, labels);
                    sb.Append(' ').Append(s.Count).Append('\n');
                }
            }
        }
    }

    private sealed class GaugeFamily(string name, string help, string[] labelNames, Func<IEnumerable<(string[] Labels, double Value)>> read, string type = "gauge")
        : Family(name, help, type, labelNames)
    {
        protected override void RenderSamples(StringBuilder sb)
        {
            foreach (var (labels, value) in read())
            {
                sb.Append(Name);
                AppendLabels(sb, labels);
                sb.Append(' ').Append(Format(value)).Append('\n');
            }
        }
    }

    public sealed class StrongBox
    {
        public double Value;

        public void Add(double value)
        {
            lock (this)
                Value += value;
        }
    }
}
