using KvFabric.Tiers;

namespace KvFabric.Bench.Replay;

/// <summary>
/// An experiment, not a policy: a door in front of a tier's policy that decides every first sighting of a block from a
/// list written beforehand (<c>perf/Replay/first_reuse_door.py</c>: a predictor told the future with a chosen recall and
/// false-positive rate, or a feature table fitted on the whole trace in hindsight). A block in the list enters the tier
/// at its first sighting (into the inner policy's probation); any other first sighting is refused. Blocks seen before
/// go to the inner policy's own door. It measures how good a predictor of first reuses an online policy would need
/// (docs/tiers-policies.md, "How good a predictor the target asks for"). The inner policy is not asked about first
/// sightings, so with an adaptive probation its ghosts do not see the refusals: use a fixed probation share.
/// </summary>
public sealed class FirstSightingDoor(IEvictionPolicy inner, IReadOnlySet<ulong> admitted) : IEvictionPolicy
{
    private readonly Dictionary<BlockKey, int> _sightings = [];

    public string Name => inner.Name + "+first-sighting-door";

    public bool ShouldAdmit(in PolicyBlockInfo info) =>
        _sightings.GetValueOrDefault(info.Key) <= 1 ? admitted.Contains(info.Key.Hash.Lo) : inner.ShouldAdmit(info);

    public void OnSighting(in PolicyBlockInfo info)
    {
        _sightings[info.Key] = _sightings.GetValueOrDefault(info.Key) + 1;
        inner.OnSighting(info);
    }

    public void OnAdmit(int handle, in PolicyBlockInfo info) => inner.OnAdmit(handle, info);

    public void OnAccess(int handle) => inner.OnAccess(handle);

    public void OnRemove(int handle) => inner.OnRemove(handle);

    public void SetEvictable(int handle, bool evictable) => inner.SetEvictable(handle, evictable);

    public bool TryPickVictim(out int handle) => inner.TryPickVictim(out handle);

    /// <summary>Reads the list: one trace block id per line.</summary>
    public static HashSet<ulong> Load(string path)
    {
        var ids = new HashSet<ulong>();
        int line = 0;
        foreach (string text in File.ReadLines(path))
        {
            line++;
            if (text.Length == 0)
                continue;
            if (!ulong.TryParse(text, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out ulong id))
                throw new InvalidDataException($"--first-sighting-door {path}, line {line}: '{text}' is not a block id (one trace hash id per line)");
            ids.Add(id);
        }
        return ids;
    }
}
