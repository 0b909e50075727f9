using System.Text;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;
using Xunit;

namespace KvFabric.Tests.Transfer;

public sealed class MetadataAndChecksumTests
{
    [Fact]
    public async Task Metadata_round_trips_every_field()
    {
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "prefill-0", LayoutFingerprint = new byte[] { 9, 8, 7 } });
        using var anon = new AnonymousMemory(1 << 20);
        using var shm = SharedMemorySegment.Create(1 << 20, "md");
        agent.Register(anon);
        agent.Register(shm);
        var md = agent.GetMetadata();

        var back = AgentMetadata.Parse(md.ToBytes());

        Assert.Equal(md.Name, back.Name);
        Assert.Equal(agent.AgentId, back.AgentId);
        Assert.Equal(md.HostId, back.HostId);
        Assert.Equal(Environment.ProcessId, back.ProcessId);
        Assert.Equal("127.0.0.1", back.TcpHost);
        Assert.Equal(agent.TcpEndpoint.Port, back.TcpPort);
        Assert.Equal(agent.Options.MaxChunkBytes, back.MaxChunkBytes);
        Assert.Equal(new byte[] { 9, 8, 7 }, back.LayoutFingerprint.ToArray());
        Assert.Equal(md.Regions, back.Regions);
        Assert.Contains(back.Regions, r => r.Kind == MemoryKind.SharedHost && r.MappedPath == shm.MappedPath);
        Assert.Contains(back.Regions, r => r.Kind == MemoryKind.Host && r.MappedPath is null);
    }

    [Fact]
    public async Task Malformed_metadata_is_refused_with_the_reason()
    {
        await using var agent = new TransferAgent();
        using var anon = new AnonymousMemory(4096);
        agent.Register(anon);
        byte[] good = agent.ExportMetadata();
        Assert.Contains("magic", Assert.Throws<TransferException>(() => AgentMetadata.Parse(Encoding.UTF8.GetBytes("hello world, not metadata"))).Message);
        Assert.Contains("truncated", Assert.Throws<TransferException>(() => AgentMetadata.Parse(good.AsSpan(0, good.Length - 3))).Message);
        byte[] longer = [.. good, 0];
        Assert.Contains("unexpected bytes", Assert.Throws<TransferException>(() => AgentMetadata.Parse(longer)).Message);
        byte[] future = (byte[])good.Clone();
        future[4] = 99;
        Assert.Contains("version 99", Assert.Throws<TransferException>(() => AgentMetadata.Parse(future)).Message);
        await using var other = new TransferAgent();
        Assert.Contains("own metadata", (await Assert.ThrowsAsync<TransferException>(() => agent.LoadRemoteAsync(good))).Message);
    }

    [Fact]
    public void Checksums_match_published_vectors()
    {
        // CRC-32C check value (RFC 3720 / iSCSI) and XXH3-64 of the empty input and of "a" (xxHash reference).
        Assert.Equal(0xE3069283u, Checksums.Crc32C("123456789"u8));
        Assert.Equal(0x2D06800538D394C2UL, Checksums.XxHash3(""u8));
        Assert.Equal(0xE6C632B61E964E1FUL, Checksums.XxHash3("a"u8));
        var data = new byte[4099];
        DataPattern.Fill(data, 3, 0);
        ulong before = Checksums.Compute(ChecksumKind.XxHash3, data);
        data[2048] ^= 1;
        Assert.NotEqual(before, Checksums.Compute(ChecksumKind.XxHash3, data));
        Assert.NotEqual(Checksums.Crc32C(data[..4098]), Checksums.Crc32C(data));
    }

    [Fact]
    public void The_data_pattern_depends_on_seed_and_position_and_finds_the_first_bad_byte()
    {
        var a = new byte[1000];
        var b = new byte[1000];
        DataPattern.Fill(a, 1, 0);
        DataPattern.Fill(b, 2, 0);
        Assert.NotEqual(a, b);
        DataPattern.Fill(b, 1, 8);
        Assert.NotEqual(a, b);
        // A sub-range filled at its own offset (unaligned) equals the same range of the whole.
        var part = new byte[333];
        DataPattern.Fill(part, 1, 101);
        Assert.Equal(a.AsSpan(101, 333).ToArray(), part);
        Assert.Equal(-1, DataPattern.FindMismatch(a.AsSpan(101, 333), 1, 101));
        a[517] ^= 0x80;
        Assert.Equal(517 - 101, DataPattern.FindMismatch(a.AsSpan(101, 600), 1, 101));
    }
}
