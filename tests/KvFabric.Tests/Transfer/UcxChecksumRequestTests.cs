using System.Buffers.Binary;
using System.Reflection;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Ucx;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>The target side of the UCX checksum requests (KindVerify/KindDigest), fed forged ranges directly.</summary>
public sealed class UcxChecksumRequestTests
{
    private const byte KindVerify = 3, KindDigest = 4;

    private static (byte Status, byte[]? Payload) Request(TransferAgent agent, byte kind, byte[] data)
    {
        byte[] header = new byte[27 + 1];
        header[8] = kind;
        BinaryPrimitives.WriteUInt16LittleEndian(header.AsSpan(25), 1);
        header[27] = (byte)'x';
        var onRequest = typeof(UcxBackend).GetMethod("OnRequest", BindingFlags.NonPublic | BindingFlags.Instance)!;
        return ((byte, byte[]?))onRequest.Invoke(agent.Ucx, [(ReadOnlyMemory<byte>)header, (ReadOnlyMemory<byte>)data])!;
    }

    private static byte[] Entry(byte kind, RegisteredRegion region, ulong address, int length)
    {
        int size = kind == KindVerify ? 32 : 24;
        byte[] data = new byte[1 + size];
        data[0] = (byte)ChecksumKind.XxHash3;
        BinaryPrimitives.WriteUInt32LittleEndian(data.AsSpan(1), region.Id);
        BinaryPrimitives.WriteInt32LittleEndian(data.AsSpan(5), length);
        BinaryPrimitives.WriteUInt64LittleEndian(data.AsSpan(9), region.Key.Value);
        BinaryPrimitives.WriteUInt64LittleEndian(data.AsSpan(17), address);
        return data;
    }

    [Theory]
    [InlineData(KindVerify)]
    [InlineData(KindDigest)]
    public async Task A_range_whose_end_wraps_past_the_top_of_the_address_space_is_refused_not_read(byte kind)
    {
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "ucx-target", EnableUcx = true, UcxSettings = new Dictionary<string, string> { ["TLS"] = "tcp" } });
        Assert.True(agent.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {agent.UcxUnavailableReason}");
        using var memory = new AnonymousMemory(1 << 20);
        var region = agent.Register(memory);

        // In range: answered.
        var ok = Request(agent, kind, Entry(kind, region, region.Address + 4096, 4096));
        Assert.Equal((byte)KvFabric.Transfer.Tcp.WireStatus.Ok, ok.Status);

        // address >= region start and address + length (mod 2^64) <= region end, yet far outside the region.
        var wrapped = Request(agent, kind, Entry(kind, region, ulong.MaxValue - 4095, 8192));
        Assert.Equal((byte)KvFabric.Transfer.Tcp.WireStatus.OutOfRange, wrapped.Status);
    }

    [Fact]
    public async Task A_request_the_target_fails_to_handle_is_answered_with_a_status_instead_of_left_to_the_deadline()
    {
        var settings = new Dictionary<string, string> { ["TLS"] = "tcp" };
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "ucx-initiator", EnableUcx = true, UcxSettings = settings });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "ucx-target", EnableUcx = true, UcxSettings = settings });
        Assert.True(target.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {target.UcxUnavailableReason}");
        using var source = new AnonymousMemory(1 << 20);
        using var destination = new AnonymousMemory(1 << 20);
        var local = initiator.Register(source);
        var far = target.Register(destination);
        // The target's handler throws, as computing a checksum whose native library is missing there does.
        object worker = typeof(UcxBackend).GetField("_worker", BindingFlags.NonPublic | BindingFlags.Instance)!.GetValue(target.Ucx)!;
        worker.GetType().GetProperty("OnRequest")!.SetValue(worker,
            new Func<ReadOnlyMemory<byte>, ReadOnlyMemory<byte>, (byte, byte[]?)>((_, _) => throw new DllNotFoundException("libxxhash.so.0")));
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());
        var write = initiator.Prepare(TransferOp.Write, [local.Descriptor(0, 1 << 20)], remote, [far.Descriptor(0, 1 << 20)],
            new TransferOptions { Backend = BackendKind.Ucx, Deadline = TimeSpan.FromSeconds(20) });
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var result = await initiator.PostAsync(write);
        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"answered only after {clock.Elapsed}: {result}");
    }
}
