using System.Numerics;
using FsCheck;
using FsCheck.Fluent;
using KvFabric.Blocks;
using KvFabric.Tiers;
using Microsoft.FSharp.Core;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

// Random operation sequences over a random forest of chains on small 2-3 tier configurations. After every operation:
// the event stream replayed into a model says exactly where each block is; accounting matches it and stays within
// [0, capacity]; no cached block lacks its parent or sits above it (leaf-first); pinned and in-use blocks were not evicted.
public sealed class TierPropertyTests
{
    private const int Nodes = 12;

    public enum OpKind { Put, Get, Pin, Unpin, Delete, Advance, Acquire, Release }

    public sealed record Op(OpKind Kind, int Node, int Arg);

    public sealed record Scenario(int[] BlocksPerTier, bool WriteThrough, bool SsdFilter, bool Promote, int[] Parents, Op[] Ops)
    {
        public override string ToString() =>
            $"tiers=[{string.Join(",", BlocksPerTier)}] writeThrough={WriteThrough} filter={SsdFilter} promote={Promote} " +
            $"parents=[{string.Join(",", Parents)}] ops=[{string.Join("; ", Ops.Select(o => $"{o.Kind} {o.Node} {o.Arg}"))}]";
    }

    private static Gen<Scenario> Scenarios()
    {
        var op = Gen.Frequency(
                (5, Gen.Constant(OpKind.Put)), (3, Gen.Constant(OpKind.Get)), (2, Gen.Constant(OpKind.Pin)),
                (1, Gen.Constant(OpKind.Unpin)), (1, Gen.Constant(OpKind.Delete)), (1, Gen.Constant(OpKind.Advance)),
                (1, Gen.Constant(OpKind.Acquire)), (1, Gen.Constant(OpKind.Release)))
            .SelectMany(kind => Gen.Choose(0, Nodes - 1), (kind, node) => (kind, node))
            .SelectMany(_ => Gen.Choose(0, 3), (kn, arg) => new Op(kn.kind, kn.node, arg));
        var parents = Gen.CollectToArray(Enumerable.Range(0, Nodes).Select(i => Gen.Choose(-1, i - 1)));
        return
            from tierCount in Gen.Choose(2, 3)
            from blocks in Gen.ArrayOf(Gen.Choose(1, 4), tierCount)
            from writeThrough in Gen.Elements(false, true)
            from filter in Gen.Elements(false, true)
            from promote in Gen.Elements(false, true)
            from ps in parents
            from length in Gen.Choose(5, 40)
            from ops in Gen.ArrayOf(op, length)
            select new Scenario(blocks, writeThrough, filter, promote, ps, ops);
    }

    [Fact]
    public void Random_operation_sequences_keep_every_tier_invariant()
    {
        var config = Config.QuickThrowOnFailure
            .WithMaxTest(250)
            .WithReplay(FSharpOption<Replay>.Some(new Replay(new Rnd(0x5EED_0001UL, 0x9E37_79B9_7F4A_7C15UL), FSharpOption<int>.None)));
        Prop.ForAll(Scenarios().ToArbitrary(), (Func<Scenario, bool>)(s =>
        {
            Run(s).GetAwaiter().GetResult();
            return true;
        })).Check(config);
    }

    private static int[] Path(int[] parents, int node)
    {
        var path = new List<int>();
        for (int n = node; n >= 0; n = parents[n])
            path.Add(n);
        path.Reverse();
        return [.. path];
    }

    private static async Task Run(Scenario s)
    {
        await using var rig = new TierRig(s.BlocksPerTier, s.WriteThrough ? WritePolicy.WriteThrough : WritePolicy.WriteBack, s.Promote,
            configure: (o, i) => s.SsdFilter && i == s.BlocksPerTier.Length - 1 ? o with { Admission = new SeenTwiceAdmissionFilter(64) } : o);
        var model = new Model(rig, s);
        foreach (var op in s.Ops)
        {
            var before = model.ProtectedMasks();
            var path = Path(s.Parents, op.Node);
            var hashes = path.Select(Hash).ToArray();
            switch (op.Kind)
            {
                case OpKind.Put:
                    var r = await rig.Manager.PutAsync(0, null, path.Select(n => new BlockPut(Hash(n), Bytes(n, TierRig.BlockBytes))).ToArray());
                    Assert.Equal(path.Length, r.Stored + r.AlreadyPresent + r.NotStored);
                    if (r.IsComplete)
                        model.Check(path.All(n => rig.Residency(n) != 0), "a complete put left a block uncached");
                    break;
                case OpKind.Get:
                    var (read, buffers) = await GetPath(rig, hashes);
                    for (int i = 0; i < read; i++)
                        Assert.Equal(Bytes(path[i], TierRig.BlockBytes), buffers[i]);
                    await rig.Manager.WhenPromotionsIdleAsync();
                    break;
                case OpKind.Pin:
                    model.Pin(path, TimeSpan.FromMinutes(op.Arg + 1));
                    break;
                case OpKind.Unpin:
                    model.Unpin(path);
                    break;
                case OpKind.Delete:
                    await rig.Manager.DeleteAsync(0, Hash(op.Node));
                    break;
                case OpKind.Advance:
                    rig.Time.Advance(TimeSpan.FromMinutes(op.Arg));
                    break;
                case OpKind.Acquire:
                    model.Scopes.Add((rig.Manager.Acquire(0, hashes), path));
                    break;
                case OpKind.Release:
                    if (model.Scopes.Count > 0)
                    {
                        model.Scopes[0].Scope.Dispose();
                        model.Scopes.RemoveAt(0);
                    }
                    break;
            }
            model.Verify(before, op);
        }
        foreach (var (scope, _) in model.Scopes)
            scope.Dispose();
    }

    private static async Task<(int, byte[][])> GetPath(TierRig rig, BlockHash[] hashes)
    {
        var buffers = hashes.Select(_ => new byte[TierRig.BlockBytes]).ToArray();
        int read = await rig.Manager.GetAsync(0, hashes, buffers.Select(b => (Memory<byte>)b).ToArray());
        return (read, buffers);
    }

    private sealed class Model(TierRig rig, Scenario s)
    {
        private readonly int[] _mask = new int[Nodes];
        private readonly int[] _pins = new int[Nodes];
        private readonly long[] _pinnedUntil = new long[Nodes];
        private int _eventsSeen;
        private ulong _lastSequence;

        public List<(BlockUseScope Scope, int[] Path)> Scopes { get; } = [];

        public void Check(bool condition, string what)
        {
            if (!condition)
                throw new InvalidOperationException($"{what} in {s}");
        }

        private long Now => rig.Time.GetUtcNow().UtcTicks;

        private bool IsPinned(int n) => _pins[n] > 0 && _pinnedUntil[n] > Now;

        // The same counted-lease rules as the manager, for blocks that are cached when pinned.
        public void Pin(int[] path, TimeSpan lease)
        {
            int expected = 0;
            foreach (int n in path)
            {
                if (_mask[n] == 0)
                    continue;
                if (!IsPinned(n))
                    _pins[n] = 0;
                _pins[n]++;
                _pinnedUntil[n] = Math.Max(_pinnedUntil[n], Now + lease.Ticks);
                expected++;
            }
            Check(rig.Manager.Pin(0, path.Select(Hash).ToArray(), lease) == expected, "Pin pinned a different number of blocks");
        }

        public void Unpin(int[] path)
        {
            int expected = 0;
            foreach (int n in path)
            {
                if (!IsPinned(n))
                    continue;
                if (--_pins[n] == 0)
                    _pinnedUntil[n] = 0;
                expected++;
            }
            Check(rig.Manager.Unpin(0, path.Select(Hash).ToArray()) == expected, "Unpin unpinned a different number of blocks");
        }

        public int[] ProtectedMasks()
        {
            var masks = new int[Nodes];
            for (int n = 0; n < Nodes; n++)
            {
                if (IsPinned(n))
                    masks[n] = _mask[n];
            }
            foreach (var (scope, path) in Scopes)
            {
                for (int i = 0; i < scope.Count; i++)
                    masks[path[i]] = _mask[path[i]];
            }
            return masks;
        }

        public void Verify(int[] protectedBefore, Op op)
        {
            // Replay the new events into the model.
            var events = rig.Sink.Events;
            for (; _eventsSeen < events.Count; _eventsSeen++)
            {
                var e = events[_eventsSeen];
                Check(e.Sequence == _lastSequence + 1, $"event sequence jumped from {_lastSequence} to {e.Sequence}");
                _lastSequence = e.Sequence;
                int n = (int)e.Block.Lo;
                int tier = rig.Manager.Tiers.ToList().IndexOf(e.Tier);
                if (e.Kind == KvEventKind.Stored)
                {
                    Check((_mask[n] & (1 << tier)) == 0, $"Stored twice in {e.Tier} for block {n}");
                    _mask[n] |= 1 << tier;
                    Check(e.Depth == Path(s.Parents, n).Length - 1, $"event depth {e.Depth} wrong for block {n}");
                }
                else
                {
                    Check((_mask[n] & (1 << tier)) != 0, $"Removed from {e.Tier} but block {n} was not there");
                    _mask[n] &= ~(1 << tier);
                }
            }
            var stats = rig.Manager.Stats();
            for (int n = 0; n < Nodes; n++)
            {
                Check(rig.Residency(n) == _mask[n], $"after {op}: block {n} is in tiers {rig.Residency(n)} but the events say {_mask[n]}");
                if (_mask[n] == 0)
                {
                    _pins[n] = 0;
                    _pinnedUntil[n] = 0;
                    continue;
                }
                int parent = s.Parents[n];
                if (parent >= 0)
                {
                    Check(_mask[parent] != 0, $"after {op}: block {n} is cached but its parent {parent} is not (orphan)");
                    Check(BitOperations.TrailingZeroCount(_mask[parent]) <= BitOperations.TrailingZeroCount(_mask[n]),
                        $"after {op}: block {n} sits in a faster tier than its parent {parent}");
                }
                Check((protectedBefore[n] & ~_mask[n]) == 0, $"after {op}: pinned or in-use block {n} left tiers {protectedBefore[n] & ~_mask[n]}");
            }
            for (int t = 0; t < stats.Tiers.Count; t++)
            {
                var tier = stats.Tiers[t];
                int count = _mask.Count(m => (m & (1 << t)) != 0);
                Check(tier.UsedBytes == (long)count * TierRig.BlockBytes, $"after {op}: tier {t} accounts {tier.UsedBytes} bytes for {count} blocks");
                Check(tier.UsedBytes >= 0 && tier.UsedBytes <= tier.CapacityBytes && tier.ReservedBytes == 0, $"after {op}: tier {t} accounting out of range");
                Check(tier.Blocks == count && rig.Stores[t].Count == count, $"after {op}: tier {t} holds {rig.Stores[t].Count} blocks in its store, {tier.Blocks} in its stats, {count} by the events");
            }
        }
    }
}
