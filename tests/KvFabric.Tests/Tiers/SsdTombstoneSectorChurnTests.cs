using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;
using Xunit;
using static KvFabric.Tests.Tiers.SsdTombstoneLogNoSpaceTests;

namespace KvFabric.Tests.Tiers;

// Four writers and removers while the log's disk stays full, with compaction and spare-segment reuse: a crash image taken
// each round must hold exactly the model (removed blocks absent, re-puts with their new bytes).
public sealed class SsdTombstoneSectorChurnTests
{
    private static SsdBlockStoreOptions Options(string dir, Func<bool> full, long capacity = 64L << 20) =>
        Ssd.Options(dir, capacity: capacity, compression: false, device: path => new FaultyDevice(Ssd.RealDevice(path)) { FailWhen = full })
            with { NoSpaceRetry = TimeSpan.FromHours(1) };

    private static byte[] Version(int i, int v) => Ssd.Block(i + 100_000 * v);

    private static async Task Check(SsdBlockStore s, Dictionary<int, int?> model, string when)
    {
        foreach (var (i, v) in model)
        {
            var got = await Ssd.Read(s, i);
            if (v is null)
                Assert.True(got is null, $"{when}: key {i} was removed (durably) but is back");
            else
            {
                Assert.True(got is not null, $"{when}: key {i} v{v} acknowledged but missing");
                Assert.True(Version(i, v.Value).AsSpan().SequenceEqual(got), $"{when}: key {i} has wrong bytes (expected v{v})");
            }
        }
    }

    // Spare reuse: the segments holding sectors and the records they cancel are retired as spares and reused while the
    // disk stays full; removals, re-puts, compaction; crash images at each quiet point.
    [Fact]
    public async Task Sectors_spares_compaction_and_reputs_under_churn_keep_the_model()
    {
        using var dir = new TempDir();
        bool full = false;
        var options = Options(dir.Path, () => Volatile.Read(ref full), capacity: 8L << 20);
        await using var store = await SsdBlockStore.OpenAsync(options);
        var model = new Dictionary<int, int?>();
        var versions = new Dictionary<int, int>();
        var rng = new Random(7);
        for (int i = 0; i < 80; i++)
        {
            if (await store.WriteAsync(Ssd.Key(i), Ssd.Meta(i), Version(i, 0)))
            {
                model[i] = 0;
                versions[i] = 0;
            }
        }
        Volatile.Write(ref full, true);
        for (int round = 0; round < 12; round++)
        {
            var tasks = new List<Task>();
            for (int w = 0; w < 4; w++)
            {
                int seed = rng.Next(), writer = w;
                tasks.Add(Task.Run(async () =>
                {
                    var r = new Random(seed);
                    for (int op = 0; op < 40; op++)
                    {
                        // Each writer owns the keys i % 4 == writer: the model is updated after the store call, so two
                        // writers racing on one key (a remove landing between another's write and its model update)
                        // would make the model, not the store, wrong.
                        int i = r.Next(0, 30) * 4 + writer;
                        lock (model)
                        {
                            if (!model.ContainsKey(i))
                                model[i] = null;
                        }
                        if (r.Next(2) == 0)
                        {
                            if (store.Remove(Ssd.Key(i)))
                                lock (model) model[i] = null;
                        }
                        else
                        {
                            int v;
                            lock (model) v = versions.GetValueOrDefault(i, -1) + 1;
                            bool ok;
                            try
                            {
                                ok = await store.WriteAsync(Ssd.Key(i), Ssd.Meta(i), Version(i, v));
                            }
                            catch (TierException)
                            {
                                continue;
                            }
                            lock (model)
                            {
                                // WriteAsync returns true without writing when the key is already stored
                                if (ok && model[i] is null)
                                {
                                    model[i] = v;
                                    versions[i] = v;
                                }
                            }
                        }
                    }
                }));
            }
            await Task.WhenAll(tasks);
            await store.WaitForCompactionAsync();
            await WaitFor(() => store.RemovalsNotDurable == 0, "sectors written");
            await store.WaitForCompactionAsync();
            using (var image = CrashImage(dir.Path))
            await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, capacity: 8L << 20, compression: false)))
            {
                await Check(crashed, model, $"round {round} (sectors {store.TombstoneSectorsWritten}, compacted {store.CompactedSegments})");
                Assert.Equal(0, crashed.RecoveredCorruptRecords);
            }
            await Check(store, model, $"live round {round}");
        }
        Assert.True(store.CompactedSegments > 2, $"compacted {store.CompactedSegments}");
        Assert.True(store.TombstoneSectorsWritten > 0);
    }
}
