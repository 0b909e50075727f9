using FASTER.core;

namespace KvFabric.Tiers.Ssd;

/// <summary>
/// FASTER's commit records in one <see cref="SsdSlotFile"/>: two 4 KiB slots written alternately with one O_DIRECT |
/// O_DSYNC write each. FASTER's default manager creates a file per commit and deletes the previous one (create + sync
/// write + unlink: 5-15 ms of journal traffic per commit here, which capped group commit at a third of the disk,
/// docs/tiers-ssd.md). A torn slot fails its checksum and the other slot, the previous commit, is used, whose data is
/// still on disk because FASTER frees segments only after a commit lands.
/// </summary>
internal sealed class SsdCommitFile(string path) : ILogCommitManager
{
    private const uint Magic = 0x4D435653; // "SVCM"

    private readonly SsdSlotFile _slots = new(path, Magic);

    /// <summary>Asked before each commit record: true skips it (a write of the log failed, and FASTER would record an
    /// address past the lost range; the store reopens the log from the last good commit instead).</summary>
    public Func<bool>? Refuse { get; set; }

    public void Commit(long beginAddress, long untilAddress, byte[] commitMetadata, long commitNum, bool forceWriteMetadata)
    {
        if (Refuse?.Invoke() == true)
            return;
        if (commitMetadata.Length > SsdSlotFile.ContentBytes)
            throw new TierException($"FASTER commit metadata of {commitMetadata.Length} bytes does not fit a {SsdSlotFile.SlotBytes}-byte slot of {path}; "
                + "this SSD tier uses no named iterators or cookies, so this is a bug: report it.");
        _slots.Write(commitNum, commitMetadata);
    }

    public IEnumerable<long> ListCommits() => _slots.Slots.Select(s => s.Number).ToArray();

    public byte[] GetCommitMetadata(long commitNum) =>
        _slots.Slots.FirstOrDefault(s => s.Number == commitNum).Content ?? throw new InvalidOperationException($"no commit {commitNum} in {path}");

    public void RemoveCommit(long commitNum)
    {
        // Slots are overwritten in turn; nothing to delete.
    }

    public void RemoveAllCommits() => _slots.Clear();

    public void OnRecovery(long commitNum)
    {
    }

    public void Dispose() => _slots.Dispose();
}
