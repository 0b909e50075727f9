using System.Globalization;

namespace KvFabric.Tiers.Ssd;

// The log's geometry, written once into the directory. FASTER addresses records by page and segment and does not persist
// either size, so opening a log with other sizes would misread it: a mismatch is refused before FASTER sees the files.
internal static class SsdLogFormat
{
    public const string FileName = "kvfabric-ssd.format";
    // v2: payloads in data segments (blocks.data.N), block references in the FASTER log. A v1 directory (payloads inline in
    // the log) differs in this line and is refused like any other geometry mismatch.
    private const string Magic = "kvfabric-ssd-log v2";

    public static void CheckOrCreate(string dir, SsdBlockStoreOptions options, string logFilePrefix)
    {
        string path = Path.Combine(dir, FileName);
        string expected = Describe(options);
        if (File.Exists(path))
        {
            string actual = File.ReadAllText(path);
            if (actual != expected)
                throw new TierException($"The SSD tier in {dir} was created with a different log geometry ({Flat(actual)}) than this "
                    + $"store's options ({Flat(expected)}). Open it with the same LogPageBytes and SegmentBytes, or move the directory aside to start empty.");
            return;
        }
        if (System.IO.Directory.EnumerateFiles(dir, logFilePrefix + ".*").Any())
            throw new TierException($"{dir} holds log segments ({logFilePrefix}.*) but no {FileName}: it was not written by this version of the SSD tier. "
                + "Move it aside or point the tier at an empty directory.");
        // Durable before the first record: write, fsync, rename, so a crash leaves either no file or the whole file.
        string temp = path + ".tmp";
        using (var f = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            f.Write(System.Text.Encoding.UTF8.GetBytes(expected));
            f.Flush(flushToDisk: true);
        }
        File.Move(temp, path, overwrite: true);
    }

    private static string Describe(SsdBlockStoreOptions o) => string.Create(CultureInfo.InvariantCulture,
        $"{Magic}\nlog_page_bytes={o.LogPageBytes}\nsegment_bytes={o.SegmentBytes}\n");

    private static string Flat(string s) => s.Trim().Replace('\n', ' ');
}
