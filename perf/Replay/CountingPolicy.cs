using KvFabric.Tiers;

namespace KvFabric.Bench.Replay;

/// <summary>Counts the calls a replay makes into a policy, so the replay's wall time gives metadata operations per second.</summary>
public sealed class CountingPolicy(IEvictionPolicy inner) : IEvictionPolicy
{
    public long Calls { get; private set; }

    public string Name => inner.Name;

    public bool ShouldAdmit(in PolicyBlockInfo info)
    {
        Calls++;
        return inner.ShouldAdmit(info);
    }

    public void OnAdmit(int handle, in PolicyBlockInfo info)
    {
        Calls++;
        inner.OnAdmit(handle, info);
    }

    public void OnSighting(in PolicyBlockInfo info)
    {
        Calls++;
        inner.OnSighting(info);
    }

    public void OnAccess(int handle)
    {
        Calls++;
        inner.OnAccess(handle);
    }

    public void OnRemove(int handle)
    {
        Calls++;
        inner.OnRemove(handle);
    }

    public void SetEvictable(int handle, bool evictable)
    {
        Calls++;
        inner.SetEvictable(handle, evictable);
    }

    public bool TryPickVictim(out int handle)
    {
        Calls++;
        return inner.TryPickVictim(out handle);
    }
}
