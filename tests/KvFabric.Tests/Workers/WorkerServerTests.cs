using KvFabric.Client.Grpc;
using KvFabric.Memory;
using KvFabric.Rpc.V1;
using KvFabric.Transfer;
using KvFabric.Workers.Handoff;
using KvFabric.Workers.Serving;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Workers;

/// <summary>A decode worker's gRPC service in this process, fed by a test transfer agent standing in for the prefill side.</summary>
public sealed class WorkerServerTests
{
    [Fact]
    public async Task A_decode_that_fails_before_taking_its_kv_gives_the_hand_off_slots_back()
    {
        var options = new WorkerOptions { Role = WorkerRole.Decode, Name = "decode-test", Model = "tiny", KvBlocks = 64, HandoffSlots = 8 };
        await using var server = new WorkerServer(options, NullLoggerFactory.Instance);
        await server.StartAsync();
        using var client = new WorkerClient(options.Name, $"http://{server.Endpoint}", options.Tenant, options.Token);
        int tpb = ModelConfigs.Tiny.TokensPerBlock;
        int blockBytes = checked((int)ModelConfigs.Tiny.ToKvLayout().BlockBytes);

        // The prefill side: its own agent and registered blocks.
        await using var sender = new TransferAgent(new TransferAgentOptions { Name = "prefill-test" });
        using var blocks = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = blockBytes, SlotCount = 2, Tag = "test-kv" });
        sender.Register(blocks);

        var call = new CallOptions(TimeSpan.FromSeconds(20), CancellationToken.None);
        HandoffReservation t = (await client.ReserveAsync(requestId: 7, promptTokens: 2 * tpb, call)).Ticket;
        Assert.Equal(2, t.Addresses.Count);
        Assert.Equal(6u, (await client.StatusAsync(call)).HandoffSlotsFree);

        // The KV lands (every byte in place, the notification delivered) ...
        RemoteAgent receiver = await sender.LoadRemoteAsync(t.AgentMetadata.Memory);
        var ticket = new HandoffTicket(t.RequestId, t.Nonce, new Guid(t.ReceiverAgent.Span), [.. t.Addresses], (int)t.BlockBytes, TimeSpan.FromMilliseconds(t.LeaseMs));
        TransferResult sent = await HandoffSender.SendAsync(sender, receiver, ticket, new[] { blocks.Rent().Address, blocks.Rent().Address }, backend: BackendKind.Tcp);
        Assert.True(sent.IsSuccess, sent.ToString());
        await Task.Delay(200); // the receiver takes the notification off its agent's queue

        // ... but the Decode is refused before it takes it (here: an empty prompt).
        await using (var stream = client.Decode(new DecodeRequest { RequestId = 7, MaxNewTokens = 4 }, call))
        {
            RpcException e = await Assert.ThrowsAsync<RpcException>(async () => await stream.ReadAsync());
            Assert.Equal(StatusCode.InvalidArgument, e.Status);
        }

        // The reservation's slots are free again (not held until the process ends).
        WorkerStatus status = await client.StatusAsync(call);
        for (int i = 0; i < 100 && status.HandoffSlotsFree != status.HandoffSlotsTotal; i++)
        {
            await Task.Delay(50);
            status = await client.StatusAsync(call);
        }

        Assert.Equal(status.HandoffSlotsTotal, status.HandoffSlotsFree);
    }
}
