using KvFabric.Memory.Device;
using KvFabric.Service;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Ssd;
using KvFabric.Tiers.Stores;
using Microsoft.Extensions.Logging;

namespace KvFabric.Sidecar;

/// <summary>
/// Builds the sidecar's tiers from its options: GPU (CUDA when a device is present, else emulated in host memory and
/// logged as such), host (a shared /dev/shm pool), SSD (FASTER log, recovered at start), each with its policy, under one
/// TierManager that the API reaches through TieredFabricStore.
/// </summary>
public sealed class SidecarTiers : IDisposable
{
    private readonly IDeviceMemory? _device;
    private readonly List<string> _described;

    private SidecarTiers(TieredFabricStore store, IDeviceMemory? device, List<string> described, SsdBlockStore? ssd)
    {
        Store = store;
        _device = device;
        _described = described;
        Ssd = ssd;
    }

    public TieredFabricStore Store { get; }

    /// <summary>The SSD tier's store, for its health figures (the manager owns it); null without an SSD tier.</summary>
    public SsdBlockStore? Ssd { get; }

    public string Describe() => string.Join("; ", _described);

    public static async Task<SidecarTiers> OpenAsync(SidecarOptions o, ILogger log, CancellationToken cancellationToken)
    {
        int blockBytes = (int)o.Layout.BlockBytes;
        var tiers = new List<TierOptions>();
        var described = new List<string>();
        IDeviceMemory? device = null;
        SsdBlockStore? ssd = null;
        try
        {
            if (o.GpuCapacityBytes > 0)
            {
                int slots = Slots(o.GpuCapacityBytes, blockBytes, "gpu_capacity");
                device = DeviceMemory.OpenDefault(o.GpuDevice, (long)slots * blockBytes);
                if (device is EmulatedDeviceMemory)
                    log.LogWarning("GPU tier is EMULATED in host memory ({Reason}); its figures are not a GPU's", CudaDeviceMemory.AvailabilityReason);
                tiers.Add(new TierOptions
                {
                    Store = new GpuBlockStore(device, blockBytes, slots),
                    Policy = PolicyFactory.Create(o.Policy, slots, o.Layout.TokensPerBlock),
                    ReadBandwidthBytesPerSecond = 20e9,
                    ReadLatencySeconds = 10e-6,
                });
                described.Add($"gpu {slots} blocks ({device})");
            }

            int hostSlots = Slots(o.HostCapacityBytes, blockBytes, "host_capacity");
            tiers.Add(new TierOptions
            {
                Store = new HostBlockStore(blockBytes, hostSlots, shared: true, lockInRam: o.LockInRam),
                // Between a GPU and an SSD tier, host memory is a middle tier (PolicyFactory.Create says why).
                Policy = PolicyFactory.Create(o.Policy, hostSlots, o.Layout.TokensPerBlock, middleTier: o.GpuCapacityBytes > 0 && o.SsdDirectory is not null),
                ReadBandwidthBytesPerSecond = 5e9,
                ReadLatencySeconds = 20e-6,
            });
            described.Add($"host {hostSlots} blocks in /dev/shm");

            if (o.SsdDirectory is not null)
            {
                ssd = await SsdBlockStore.OpenAsync(new SsdBlockStoreOptions
                {
                    Directory = o.SsdDirectory,
                    CapacityBytes = o.SsdCapacityBytes,
                    BlockBytes = blockBytes,
                    MaxBlockBytes = Math.Max(blockBytes, 1 << 20),
                    VerifyAllOnOpen = o.SsdVerifyOnOpen,
                }, cancellationToken).ConfigureAwait(false);
                log.LogInformation("SSD tier in {Directory}: {Count} blocks recovered, {Verified} payloads read and verified (the rest were covered by the settled mark)",
                    ssd.Directory, ssd.Count, ssd.RecoveredVerifiedPayloads);
                if (ssd.RecoveredCorruptRecords > 0)
                    log.LogWarning("SSD tier in {Directory}: {Count} records or tombstones failed their checksum while opening and were dropped (recomputed when next needed)",
                        ssd.Directory, ssd.RecoveredCorruptRecords);
                if (ssd.RecoveredIncompleteWrites > 0)
                    log.LogInformation("SSD tier in {Directory}: {Count} writes were under way at the last stop (never acknowledged) and were skipped",
                        ssd.Directory, ssd.RecoveredIncompleteWrites);
                if (ssd.RecoveredUnreadable is { Blocks: > 0 } unreadable)
                    log.LogWarning("SSD tier in {Directory}: the device would not read {Count} blocks while opening (first: {Error}); they stay indexed and are verified when read; check the device (dmesg)",
                        ssd.Directory, unreadable.Blocks, unreadable.FirstError);
                int ssdSlots = Slots(o.SsdCapacityBytes, blockBytes, "ssd_capacity");
                tiers.Add(new TierOptions
                {
                    Store = ssd,
                    Policy = PolicyFactory.Create(o.SsdPolicy, ssdSlots, o.Layout.TokensPerBlock),
                    Admission = o.SsdAdmission == "seen-twice" ? new SeenTwiceAdmissionFilter() : null,
                    ReadBandwidthBytesPerSecond = 1e9,
                    ReadLatencySeconds = 200e-6,
                });
                described.Add($"ssd {ssdSlots} blocks in {o.SsdDirectory} ({ssd.Count} recovered, policy {o.SsdPolicy}, admission {o.SsdAdmission})");
            }

            var options = tiers.ToArray();
            var store = new TieredFabricStore(o.Layout, o.Node, o.PutStagingBlocks, sink => new TierManager(new TierManagerOptions
            {
                Tiers = options,
                WritePolicy = o.WriteThrough ? WritePolicy.WriteThrough : WritePolicy.WriteBack,
                RecomputeSecondsPerBlock = o.RecomputeMsPerBlock / 1000,
                RecomputeSecondsPerBlockPerDepth = (o.RecomputeMsPerBlockPerDepth ?? 0) / 1000,
                Events = sink,
            }), o.EventLogCapacity, o.ReadBuffers);
            described.Add($"policy {o.Policy}, {(o.WriteThrough ? "write-through" : "write-back")}"
                          + (o.RecomputeMsPerBlock is { } ms ? $", load-vs-recompute gate at {ms} ms/block" : ", no load-vs-recompute gate"));
            return new SidecarTiers(store, device, described, ssd);
        }
        catch
        {
            foreach (var t in tiers)
                t.Store.Dispose();
            if (ssd is not null && !tiers.Any(t => ReferenceEquals(t.Store, ssd)))
                ssd.Dispose();
            device?.Dispose();
            throw;
        }
    }

    private static int Slots(long capacity, int blockBytes, string key)
    {
        long slots = capacity / blockBytes;
        if (slots < 1)
            throw new ArgumentException($"{key} ({capacity} bytes) must hold at least one block of {blockBytes} bytes");
        return (int)Math.Min(slots, int.MaxValue);
    }

    public void Dispose()
    {
        Store.Dispose();   // the manager owns and disposes the stores
        _device?.Dispose();
    }
}
