using System.Globalization;
using System.Text.Json;

namespace KvFabric.Bench.References;

/// <summary>
/// The disk limit: fio on a file in the same directory as the SSD tier, same block size and queue depth, direct I/O
/// (O_DIRECT, as the tier's device uses, so neither side reads from the page cache). The write reference also opens with
/// O_SYNC (--sync=sync), the guarantee the tier gives before it acknowledges; the plain O_DIRECT write is kept for context.
/// </summary>
public static class FioReference
{
    public static bool IsInstalled() => Tool.Exists("fio");

    /// <summary>One fio job; returns GB/s. rw: write, read, randread. The file is laid out by fio before timing when read.</summary>
    public static async Task<double> MeasureAsync(string file, string rw, long blockBytes, long totalBytes, int iodepth, bool sync, CancellationToken ct)
    {
        var args = new List<string>
        {
            "--name=kvfabric-ref", $"--filename={file}", $"--rw={rw}", $"--bs={blockBytes}", $"--size={totalBytes}",
            "--direct=1", "--ioengine=libaio", $"--iodepth={iodepth.ToString(CultureInfo.InvariantCulture)}", "--output-format=json",
            "--randrepeat=1", "--invalidate=1",
        };
        if (sync)
            args.Add("--sync=sync");
        string json = await Tool.RunAsync(TimeSpan.FromMinutes(10), ct, "fio", [.. args]).ConfigureAwait(false);
        // fio may print notices before the JSON document.
        using var doc = JsonDocument.Parse(json[json.IndexOf('{', StringComparison.Ordinal)..]);
        var job = doc.RootElement.GetProperty("jobs")[0];
        string side = rw.Contains("write", StringComparison.Ordinal) ? "write" : "read";
        return job.GetProperty(side).GetProperty("bw_bytes").GetDouble() / 1e9;
    }
}
