using System.Globalization;
using System.Text;

namespace KvFabric.Workers.Reporting;

/// <summary>One line of a chart: points in data units, drawn solid (KvFabric) or dashed (a reference).</summary>
public sealed record Series(string Name, IReadOnlyList<(double X, double Y)> Points, bool Dashed = false);

/// <summary>A hand-written SVG line chart with optional log axes, ticks, a grid and a legend. No packages.</summary>
public static class SvgChart
{
    private static readonly string[] Colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"];
    private const int Width = 760, Height = 420, Left = 70, Right = 210, Top = 40, Bottom = 60;

    public static string Line(string title, string xLabel, string yLabel, IReadOnlyList<Series> series, bool logX, bool logY, Func<double, string>? xTick = null)
    {
        var all = series.SelectMany(s => s.Points).Where(p => double.IsFinite(p.X) && double.IsFinite(p.Y) && (!logX || p.X > 0) && (!logY || p.Y > 0)).ToArray();
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{Width}\" height=\"{Height}\" viewBox=\"0 0 {Width} {Height}\" font-family=\"sans-serif\" font-size=\"12\">\n");
        sb.Append(CultureInfo.InvariantCulture, $"<rect width=\"{Width}\" height=\"{Height}\" fill=\"white\"/>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Width / 2}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{Escape(title)}</text>\n");
        if (all.Length == 0)
        {
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Width / 2}\" y=\"{Height / 2}\" text-anchor=\"middle\">no data</text>\n</svg>\n");
            return sb.ToString();
        }
        var (x0, x1) = logX ? (all.Min(p => p.X) / 1.3, all.Max(p => p.X) * 1.3) : Range(all.Select(p => p.X), logX, zeroBased: false);
        var (y0, y1) = Range(all.Select(p => p.Y), logY, zeroBased: !logY);
        double plotW = Width - Left - Right, plotH = Height - Top - Bottom;
        double Px(double x) => Left + (logX ? (Math.Log10(x) - Math.Log10(x0)) / (Math.Log10(x1) - Math.Log10(x0)) : (x - x0) / (x1 - x0)) * plotW;
        double Py(double y) => Top + plotH - (logY ? (Math.Log10(y) - Math.Log10(y0)) / (Math.Log10(y1) - Math.Log10(y0)) : (y - y0) / (y1 - y0)) * plotH;

        foreach (double t in Ticks(x0, x1, logX, distinctX: all.Select(p => p.X).Distinct().Order().ToArray()))
        {
            double px = Px(t);
            sb.Append(CultureInfo.InvariantCulture, $"<line x1=\"{px:F1}\" y1=\"{Top}\" x2=\"{px:F1}\" y2=\"{Top + plotH}\" stroke=\"#e5e5e5\"/>\n");
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{px:F1}\" y=\"{Top + plotH + 16}\" text-anchor=\"middle\">{Escape(xTick?.Invoke(t) ?? Number(t))}</text>\n");
        }
        foreach (double t in Ticks(y0, y1, logY, distinctX: null))
        {
            double py = Py(t);
            sb.Append(CultureInfo.InvariantCulture, $"<line x1=\"{Left}\" y1=\"{py:F1}\" x2=\"{Left + plotW}\" y2=\"{py:F1}\" stroke=\"#e5e5e5\"/>\n");
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Left - 6}\" y=\"{py + 4:F1}\" text-anchor=\"end\">{Escape(Number(t))}</text>\n");
        }
        sb.Append(CultureInfo.InvariantCulture, $"<rect x=\"{Left}\" y=\"{Top}\" width=\"{plotW}\" height=\"{plotH}\" fill=\"none\" stroke=\"#333\"/>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{Left + plotW / 2}\" y=\"{Height - 18}\" text-anchor=\"middle\">{Escape(xLabel)}{(logX ? " (log scale)" : "")}</text>\n");
        sb.Append(CultureInfo.InvariantCulture, $"<text transform=\"translate(18 {Top + plotH / 2}) rotate(-90)\" text-anchor=\"middle\">{Escape(yLabel)}{(logY ? " (log scale)" : "")}</text>\n");

        for (int i = 0; i < series.Count; i++)
        {
            var s = series[i];
            string color = Colors[i % Colors.Length];
            string dash = s.Dashed ? " stroke-dasharray=\"6 4\"" : "";
            var pts = s.Points.Where(p => double.IsFinite(p.X) && double.IsFinite(p.Y) && (!logX || p.X > 0) && (!logY || p.Y > 0)).OrderBy(p => p.X).ToArray();
            if (pts.Length > 1)
                sb.Append(CultureInfo.InvariantCulture, $"<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{string.Join(' ', pts.Select(p => $"{Px(p.X):F1},{Py(p.Y):F1}"))}\"/>\n");
            foreach (var p in pts)
                sb.Append(CultureInfo.InvariantCulture, $"<circle cx=\"{Px(p.X):F1}\" cy=\"{Py(p.Y):F1}\" r=\"3.5\" fill=\"{color}\"><title>{Escape(s.Name)}: {Number(p.Y)}</title></circle>\n");
            double ly = Top + 10 + i * 20;
            double lx = Left + plotW + 14;
            sb.Append(CultureInfo.InvariantCulture, $"<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{lx + 24}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n");
            sb.Append(CultureInfo.InvariantCulture, $"<text x=\"{lx + 30}\" y=\"{ly + 4}\">{Escape(s.Name)}</text>\n");
        }
        sb.Append("</svg>\n");
        return sb.ToString();
    }

    private static (double Lo, double Hi) Range(IEnumerable<double> values, bool log, bool zeroBased)
    {
        double lo = values.Min(), hi = values.Max();
        if (log)
            return (Math.Pow(10, Math.Floor(Math.Log10(lo))), Math.Pow(10, Math.Ceiling(Math.Log10(hi) + 1e-9)));
        if (zeroBased)
            lo = Math.Min(0, lo);
        if (hi <= lo)
            hi = lo + 1;
        double step = NiceStep((hi - lo) / 5);
        return (Math.Floor(lo / step) * step, Math.Ceiling(hi / step) * step);
    }

    private static IEnumerable<double> Ticks(double lo, double hi, bool log, double[]? distinctX)
    {
        if (log && distinctX is { Length: > 1 and <= 8 })
            return distinctX; // few x values (block sizes, capacities): label each
        if (log)
        {
            var ticks = new List<double>();
            for (double t = Math.Pow(10, Math.Ceiling(Math.Log10(lo) - 1e-9)); t <= hi * 1.0001; t *= 10)
                ticks.Add(t);
            return ticks;
        }
        double step = NiceStep((hi - lo) / 5);
        return Enumerable.Range(0, (int)Math.Round((hi - lo) / step) + 1).Select(i => lo + i * step);
    }

    private static double NiceStep(double raw)
    {
        double mag = Math.Pow(10, Math.Floor(Math.Log10(raw)));
        double f = raw / mag;
        return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
    }

    public static string Number(double v) => Math.Abs(v) switch
    {
        >= 1e6 => (v / 1e6).ToString("0.##", CultureInfo.InvariantCulture) + "M",
        >= 1e4 => (v / 1e3).ToString("0.##", CultureInfo.InvariantCulture) + "k",
        >= 10 => v.ToString("0.#", CultureInfo.InvariantCulture),
        _ => v.ToString("0.###", CultureInfo.InvariantCulture),
    };

    private static string Escape(string s) => s.Replace("&", "&amp;", StringComparison.Ordinal).Replace("<", "&lt;", StringComparison.Ordinal).Replace(">", "&gt;", StringComparison.Ordinal);
}
