using System.Globalization;
using System.Security.Cryptography;

namespace KvFabric.Tiers.Ssd;

// The directory's format, written once: the record format, the log geometry, and the store's secret key. FASTER addresses
// records by page and segment and does not persist either size, so opening a log with other sizes would misread it: a
// mismatch is refused before FASTER sees the files. The key seals every header sector (SsdRecordHeader.SealSector), so
// that a tenant's bytes inside a payload cannot pass for a record when recovery scans past a torn one.
internal static class SsdLogFormat
{
    public const string FileName = "kvfabric-ssd.format";
    // v5: self-describing records in data segments, tombstones in the FASTER log or, while its file system is full, as
    // tombstone sectors in the data segments, and the settled mark (settled.slots), below which opening trusts records
    // without reading them. v4 is the same without tombstone sectors, v3 without the mark either: both are upgraded in
    // place (a v4 binary would skip the sectors, bring the removed blocks back and could place a record below an address a
    // sector cancels; a v3 binary would place records below a mark it does not know: either then refuses the directory).
    // A v2 directory (block references in the log) or v1 (payloads inline in the log) differs in this line and is refused,
    // naming the version.
    private const string Magic = "kvfabric-ssd-log v5";
    private static readonly string[] UpgradableMagics = ["kvfabric-ssd-log v4", "kvfabric-ssd-log v3"];
    private const string KeyPrefix = "store_key=";

    /// <summary>Checks the directory's format against the options (or writes it for a new directory); returns the store's key.</summary>
    public static ulong CheckOrCreate(string dir, SsdBlockStoreOptions options, params string[] segmentPrefixes)
    {
        string path = Path.Combine(dir, FileName);
        string expected = Describe(options);
        if (File.Exists(path))
        {
            string actual = File.ReadAllText(path);
            int keyAt = actual.IndexOf(KeyPrefix, StringComparison.Ordinal);
            if (keyAt >= 0 && UpgradableMagics.Any(m => actual[..keyAt] == Describe(options, m)))
            {
                actual = expected + actual[keyAt..];
                WriteDurably(dir, path, actual);
                keyAt = actual.IndexOf(KeyPrefix, StringComparison.Ordinal);
            }
            if (keyAt < 0 || actual[..keyAt] != expected
                || !ulong.TryParse(actual.AsSpan(keyAt + KeyPrefix.Length).Trim(), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out ulong key))
            {
                string what = actual.StartsWith(Magic, StringComparison.Ordinal)
                    ? $"a different log geometry ({Flat(keyAt < 0 ? actual : actual[..keyAt])}) than this store's options ({Flat(expected)})"
                    : $"another on-disk format ({Flat(actual.Split('\n')[0])}; this version reads {Magic})";
                throw new TierException($"The SSD tier in {dir} was created with {what}. Open it with the same LogPageBytes and SegmentBytes, "
                    + "or move the directory aside to start empty (the SSD tier is a cache: its blocks are recomputed or fetched again).");
            }
            return key;
        }
        foreach (string prefix in segmentPrefixes)
        {
            if (System.IO.Directory.EnumerateFiles(dir, prefix + ".*").Any())
                throw new TierException($"{dir} holds segments ({prefix}.*) but no {FileName}: it was not written by this version of the SSD tier. "
                    + "Move it aside or point the tier at an empty directory.");
        }
        ulong newKey = BitConverter.ToUInt64(RandomNumberGenerator.GetBytes(8));
        WriteDurably(dir, path, expected + KeyPrefix + newKey.ToString("x16", CultureInfo.InvariantCulture) + "\n");
        return newKey;
    }

    // Durable before the first record: write, fsync, rename, sync the directory, so a crash leaves the old file or the new one.
    private static void WriteDurably(string dir, string path, string content)
    {
        string temp = path + ".tmp";
        using (var f = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            f.Write(System.Text.Encoding.UTF8.GetBytes(content));
            f.Flush(flushToDisk: true);
        }
        File.Move(temp, path, overwrite: true);
        DirectFileDevice.SyncDirectory(dir);
    }

    private static string Describe(SsdBlockStoreOptions o, string magic = Magic) => string.Create(CultureInfo.InvariantCulture,
        $"{magic}\nlog_page_bytes={o.LogPageBytes}\nsegment_bytes={o.SegmentBytes}\n");

    private static string Flat(string s) => s.Trim().Replace('\n', ' ');
}
