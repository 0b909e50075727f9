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
        await using var rig = await DecodeRig.StartAsync(kvBlocks: 64);
        WorkerClient client = rig.Client;
        int tpb = ModelConfigs.Tiny.TokensPerBlock;

        var call = new CallOptions(TimeSpan.FromSeconds(20), CancellationToken.None);
        HandoffReservation t = (await client.ReserveAsync(requestId: 7, promptTokens: 2 * tpb, call)).Ticket;
        Assert.Equal(3, t.Addresses.Count); // two full blocks, one slot of logits
        Assert.Equal(5u, (await client.StatusAsync(call)).HandoffSlotsFree);

        // The KV lands (every byte in place, the notification delivered) ...
        TransferResult sent = await rig.SendAsync(t);
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

    [Fact]
    public async Task A_ticket_whose_metadata_names_another_agent_is_refused_and_does_not_poison_the_agent_cache()
    {
        await using var pair = await WorkerPair.StartAsync();
        WorkerClient decodeClient = pair.DecodeClient, prefillClient = pair.PrefillClient;
        await using var stranger = new TransferAgent(new TransferAgentOptions { Name = "stranger" });
        var call = new CallOptions(TimeSpan.FromSeconds(60), CancellationToken.None);
        int tpb = ModelConfigs.Tiny.TokensPerBlock;
        int[] prompt = [.. Enumerable.Range(1, 2 * tpb + 1)];

        HandoffReservation bad = (await decodeClient.ReserveAsync(1, prompt.Length, call)).Ticket;
        bad.AgentMetadata = Google.Protobuf.ByteString.CopyFrom(stranger.ExportMetadata());
        var request = new PrefillRequest { RequestId = 1, Ticket = bad };
        request.Prompt.Add(prompt);
        RpcException e = await Assert.ThrowsAsync<RpcException>(() => prefillClient.PrefillAsync(request, call));
        Assert.Equal(StatusCode.InvalidArgument, e.Status);

        // The decode worker's real ticket still goes through.
        HandoffReservation good = (await decodeClient.ReserveAsync(2, prompt.Length, call)).Ticket;
        request = new PrefillRequest { RequestId = 2, Ticket = good };
        request.Prompt.Add(prompt);
        PrefillResponse response = await prefillClient.PrefillAsync(request, call);
        Assert.Equal(1u, response.HandoffAttempts);
        Assert.Equal((uint)prompt.Length, response.ComputedTokens);
    }

    [Fact]
    public async Task A_prefill_whose_lease_ran_out_before_its_turn_is_not_computed()
    {
        await using var pair = await WorkerPair.StartAsync();
        WorkerClient decodeClient = pair.DecodeClient, prefillClient = pair.PrefillClient;
        var call = new CallOptions(TimeSpan.FromSeconds(60), CancellationToken.None);
        int[] prompt = [.. Enumerable.Range(1, (2 * ModelConfigs.Tiny.TokensPerBlock) + 1)];

        // A lease shorter than the WRITE's safety margin: it has run out by the time the prefill's turn comes.
        var reserve = new ReserveHandoffRequest { RequestId = 61, PromptTokens = (uint)prompt.Length, LeaseMs = 50 };
        HandoffReservation ticket = (await decodeClient.Channel.UnaryAsync("/kvfabric.v1.Worker/Reserve", reserve, ReserveHandoffResponse.Parser, call)).Ticket;
        var request = new PrefillRequest { RequestId = 61, Ticket = ticket };
        request.Prompt.Add(prompt);
        RpcException e = await Assert.ThrowsAsync<RpcException>(() => prefillClient.PrefillAsync(request, call));
        Assert.Equal(StatusCode.DeadlineExceeded, e.Status);
        Assert.Contains("nothing was computed", e.Message, StringComparison.Ordinal);
        // Nor did it try the fabric for the prompt's prefix (the sidecar is unreachable: that would be a fallback).
        Assert.Equal(0ul, (await prefillClient.StatusAsync(call)).Fallbacks);
    }

    [Fact]
    public async Task A_prefill_that_fails_before_sending_gives_the_decode_workers_slots_back_at_once()
    {
        await using var pair = await WorkerPair.StartAsync();
        WorkerClient decodeClient = pair.DecodeClient, prefillClient = pair.PrefillClient;
        var call = new CallOptions(TimeSpan.FromSeconds(60), CancellationToken.None);
        int tpb = ModelConfigs.Tiny.TokensPerBlock;
        int[] prompt = [.. Enumerable.Range(1, 2 * tpb + 1)];

        // Reserved (with the default 60 s lease) for a shorter prompt: the Prefill is refused before it sends anything.
        HandoffReservation ticket = (await decodeClient.ReserveAsync(81, tpb, call)).Ticket;
        Assert.True((await decodeClient.StatusAsync(call)).HandoffSlotsFree < 8);
        var request = new PrefillRequest { RequestId = 81, Ticket = ticket };
        request.Prompt.Add(prompt);
        Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(() => prefillClient.PrefillAsync(request, call))).Status);

        // The prefill worker cancelled the hand-off: the slots are free now, not after the lease (60 s) and its grace.
        WorkerStatus status = await decodeClient.StatusAsync(call);
        for (int i = 0; i < 100 && status.HandoffSlotsFree != status.HandoffSlotsTotal; i++)
        {
            await Task.Delay(50);
            status = await decodeClient.StatusAsync(call);
        }

        Assert.Equal(status.HandoffSlotsTotal, status.HandoffSlotsFree);
        Assert.Equal(0ul, status.UnknownNotifications);
        // A Decode that comes for it after all is told the reservation is gone (not left waiting out the lease).
        var decodeRequest = new DecodeRequest { RequestId = 81, MaxNewTokens = 4 };
        decodeRequest.Prompt.Add(prompt[..tpb]);
        await using var stream = decodeClient.Decode(decodeRequest, call);
        Assert.Equal(StatusCode.FailedPrecondition, (await Assert.ThrowsAsync<RpcException>(async () => await stream.ReadAsync())).Status);
    }

    /// <summary>
    /// A prefill worker stops while a Prefill whose hand-off is done offloads to a sidecar that does not answer: the
    /// drain period cuts the offload off, but the Prefill still succeeds (its decode worker is streaming the tokens; an
    /// UNAVAILABLE made the driver cancel that stream and redo the request, or fail it once tokens had come).
    /// </summary>
    [Fact]
    public async Task A_prefill_whose_offload_the_drain_cuts_off_still_succeeds()
    {
        // A "sidecar" that takes connections and never answers: the offload's Put hangs until it is cancelled.
        using var silent = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        silent.Start();
        var held = new System.Collections.Concurrent.ConcurrentBag<System.Net.Sockets.TcpClient>();
        _ = Task.Run(async () =>
        {
            try
            {
                while (true)
                    held.Add(await silent.AcceptTcpClientAsync());
            }
            catch (Exception e) when (e is ObjectDisposedException or System.Net.Sockets.SocketException)
            {
                // the test ended
            }
        });

        await using var decode = new WorkerServer(new WorkerOptions { Role = WorkerRole.Decode, Name = "decode-test", Model = "tiny", KvBlocks = 64, HandoffSlots = 8 },
            NullLoggerFactory.Instance);
        await decode.StartAsync();
        var prefill = new WorkerServer(new WorkerOptions
        {
            Role = WorkerRole.Prefill, Name = "prefill-test", Model = "tiny", KvBlocks = 64, Sidecar = $"http://{silent.LocalEndpoint}",
            DrainTimeout = TimeSpan.FromMilliseconds(300),
        }, NullLoggerFactory.Instance);
        Task? stopping = null;
        try
        {
            await prefill.StartAsync();
            using var decodeClient = new WorkerClient("decode-test", $"http://{decode.Endpoint}", "dev", "dev");
            using var prefillClient = new WorkerClient("prefill-test", $"http://{prefill.Endpoint}", "dev", "dev");
            var call = new CallOptions(TimeSpan.FromSeconds(60), CancellationToken.None);
            int[] prompt = [.. Enumerable.Range(1, 2 * ModelConfigs.Tiny.TokensPerBlock + 1)];

            HandoffReservation ticket = (await decodeClient.ReserveAsync(91, prompt.Length, call)).Ticket;
            var decodeRequest = new DecodeRequest { RequestId = 91, MaxNewTokens = 4 };
            decodeRequest.Prompt.Add(prompt);
            await using var stream = decodeClient.Decode(decodeRequest, call);
            var request = new PrefillRequest { RequestId = 91, Ticket = ticket, NoReuse = true }; // no Fetch: only the offload meets the silent sidecar
            request.Prompt.Add(prompt);
            Task<PrefillResponse> prefilled = prefillClient.PrefillAsync(request, call);

            // The first token means the KV arrived: the Prefill is past its hand-off, in (or on its way to) the offload.
            Assert.NotNull(await stream.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.False(prefilled.IsCompleted, "the offload to a sidecar that never answers finished");
            stopping = prefill.DisposeAsync().AsTask();
            PrefillResponse response = await prefilled.WaitAsync(TimeSpan.FromSeconds(60));
            Assert.Equal(0u, response.OffloadedBlocks);
            Assert.Equal(1u, response.HandoffAttempts);
        }
        finally
        {
            await (stopping ?? prefill.DisposeAsync().AsTask()).WaitAsync(TimeSpan.FromSeconds(60));
            foreach (var c in held)
                c.Dispose();
        }
    }

    [Fact]
    public async Task A_generate_asking_for_no_tokens_or_too_many_is_refused_before_its_prefill()
    {
        var options = new WorkerOptions { Role = WorkerRole.Colocated, Name = "colocated-test", Model = "tiny", KvBlocks = 64, Sidecar = "http://127.0.0.1:1" };
        await using var worker = new WorkerServer(options, NullLoggerFactory.Instance);
        await worker.StartAsync();
        using var client = new WorkerClient("colocated-test", $"http://{worker.Endpoint}", "dev", "dev");
        var call = new CallOptions(TimeSpan.FromSeconds(60), CancellationToken.None);
        int[] prompt = [.. Enumerable.Range(1, (2 * ModelConfigs.Tiny.TokensPerBlock) + 1)];
        foreach (uint maxNew in new[] { 0u, (uint)(ModelConfigs.Tiny.MaxPositions - prompt.Length + 2) })
        {
            var request = new GenerateRequest { RequestId = 71, MaxNewTokens = maxNew };
            request.Prompt.Add(prompt);
            await using var stream = client.Generate(request, call);
            Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(async () => await stream.ReadAsync())).Status);
        }

        // No prefill ran for them (it would have asked the unreachable sidecar for the prefix: a fallback).
        WorkerStatus status = await client.StatusAsync(call);
        Assert.Equal(0ul, status.Fallbacks);
        Assert.Equal(status.KvBlocksTotal, status.KvBlocksFree);
    }

    [Fact]
    public async Task A_decode_whose_kv_pool_runs_dry_is_resource_exhausted_and_gives_everything_back()
    {
        // Two KV blocks: the prompt's two full blocks import, its tail needs a third.
        await using var rig = await DecodeRig.StartAsync(kvBlocks: 2);
        WorkerClient client = rig.Client;
        int tpb = ModelConfigs.Tiny.TokensPerBlock;
        var call = new CallOptions(TimeSpan.FromSeconds(20), CancellationToken.None);
        int[] prompt = [.. Enumerable.Range(1, 2 * tpb + 1)];

        HandoffReservation t = (await client.ReserveAsync(requestId: 9, promptTokens: prompt.Length, call)).Ticket;
        Assert.True((await rig.SendAsync(t)).IsSuccess);

        var request = new DecodeRequest { RequestId = 9, MaxNewTokens = 4 };
        request.Prompt.Add(prompt);
        await using (var stream = client.Decode(request, call))
        {
            RpcException e = await Assert.ThrowsAsync<RpcException>(async () => await stream.ReadAsync());
            Assert.Equal(StatusCode.ResourceExhausted, e.Status);
        }

        WorkerStatus status = await client.StatusAsync(call);
        Assert.Equal(status.KvBlocksTotal, status.KvBlocksFree);
        Assert.Equal(status.HandoffSlotsTotal, status.HandoffSlotsFree);
    }

    [Fact]
    public async Task A_hand_off_over_ucx_lands_checksummed_in_ucx_allocated_slots_and_decodes_as_a_monolithic_run()
    {
        var decodeOptions = new WorkerOptions
        {
            Role = WorkerRole.Decode, Name = "decode-ucx", Model = "tiny", KvBlocks = 64, HandoffSlots = 8, Backend = BackendKind.Ucx,
        };
        await using var decode = new WorkerServer(decodeOptions, NullLoggerFactory.Instance);
        await decode.StartAsync();
        var prefillOptions = new WorkerOptions
        {
            Role = WorkerRole.Prefill, Name = "prefill-ucx", Model = "tiny", KvBlocks = 64, Sidecar = "http://127.0.0.1:1", Backend = BackendKind.Ucx,
        };
        await using var prefill = new WorkerServer(prefillOptions, NullLoggerFactory.Instance);
        await prefill.StartAsync();
        using var decodeClient = new WorkerClient("decode-ucx", $"http://{decode.Endpoint}", "dev", "dev");
        using var prefillClient = new WorkerClient("prefill-ucx", $"http://{prefill.Endpoint}", "dev", "dev");
        var call = new CallOptions(TimeSpan.FromSeconds(60), CancellationToken.None);
        int tpb = ModelConfigs.Tiny.TokensPerBlock;
        int[] prompt = [.. Enumerable.Range(3, 2 * tpb + 5)];

        HandoffReservation ticket = (await decodeClient.ReserveAsync(5, prompt.Length, call)).Ticket;
        var request = new PrefillRequest { RequestId = 5, Ticket = ticket };
        request.Prompt.Add(prompt);
        PrefillResponse response = await prefillClient.PrefillAsync(request, call);
        Assert.Equal(1u, response.HandoffAttempts);
        WorkerStatus sender = await prefillClient.StatusAsync(call);
        Assert.Equal(response.HandoffBytes, sender.UcxBytesSent); // all of it over UCX (XXH3-verified by default)
        Assert.Equal(0ul, sender.TcpBytesSent + sender.ShmBytesWritten);

        var decodeRequest = new DecodeRequest { RequestId = 5, MaxNewTokens = 8 };
        decodeRequest.Prompt.Add(prompt);
        var tokens = new List<int>();
        await using (var stream = decodeClient.Decode(decodeRequest, call))
        {
            while (await stream.ReadAsync() is { } m)
                tokens.AddRange(m.Tokens);
        }

        var reference = new KvFabric.Workers.Model.Transformer(ModelConfigs.Tiny, threads: 1);
        using var pool = reference.CreatePool(16);
        using var cache = reference.CreateCache(pool);
        Assert.Equal(reference.Generate(prompt, 8, KvFabric.Workers.Model.Sampler.Greedy(), cache), tokens);
    }

    [Fact]
    public async Task A_reservation_whose_ticket_cannot_be_delivered_gives_its_slots_back_at_once()
    {
        await using var rig = await DecodeRig.StartAsync(kvBlocks: 64);
        var call = new CallOptions(TimeSpan.FromSeconds(20), CancellationToken.None);
        int tpb = ModelConfigs.Tiny.TokensPerBlock;
        WorkerStatus before = await rig.Client.StatusAsync(call);
        Assert.Equal(before.HandoffSlotsTotal, before.HandoffSlotsFree);

        // The Reserve is served, but the caller reset the stream as its answer went out: nobody ever got the ticket.
        using var aborted = new CancellationTokenSource();
        var dispatcher = new KvFabric.Rpc.GrpcDispatcher(rig.Server.Routes!, new KvFabric.Rpc.TenantRegistry([new KvFabric.Rpc.TenantConfig("dev", "dev")]),
            new KvFabric.Rpc.MetricsRegistry(), NullLogger.Instance, 1 << 20);
        var http = new Microsoft.AspNetCore.Http.DefaultHttpContext { RequestAborted = aborted.Token };
        http.Request.Method = "POST";
        http.Request.ContentType = GrpcProtocol.ContentType;
        http.Request.Path = "/kvfabric.v1.Worker/Reserve";
        http.Request.Headers.Authorization = "Bearer dev";
        http.Request.Headers[GrpcProtocol.TenantHeader] = "dev";
        byte[] payload = Google.Protobuf.MessageExtensions.ToByteArray(new ReserveHandoffRequest { RequestId = 21, PromptTokens = (uint)(2 * tpb), LeaseMs = 3_600_000 });
        var framed = new byte[5 + payload.Length];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(framed.AsSpan(1), (uint)payload.Length);
        payload.CopyTo(framed, 5);
        http.Request.Body = new MemoryStream(framed);
        http.Response.Body = new GoneClient(aborted);
        await dispatcher.HandleAsync(http);
        Assert.True(aborted.IsCancellationRequested, "the Reserve never answered");

        // Its slots are free now, not after the hour of its lease, and the request can reserve again.
        WorkerStatus after = await rig.Client.StatusAsync(call);
        Assert.Equal(after.HandoffSlotsTotal, after.HandoffSlotsFree);
        HandoffReservation again = (await rig.Client.ReserveAsync(requestId: 21, promptTokens: 2 * tpb, call)).Ticket;
        Assert.Equal(3, again.Addresses.Count);
    }

    [Fact]
    public async Task A_duplicated_decode_of_a_request_leaves_the_first_ones_hand_off_alone()
    {
        await using var rig = await DecodeRig.StartAsync(kvBlocks: 64);
        WorkerClient client = rig.Client;
        var call = new CallOptions(TimeSpan.FromSeconds(60), CancellationToken.None);
        int tpb = ModelConfigs.Tiny.TokensPerBlock;
        int[] prompt = [.. Enumerable.Range(1, 2 * tpb + 1)];
        HandoffReservation t = (await client.ReserveAsync(requestId: 31, promptTokens: prompt.Length, call)).Ticket;

        // The first Decode waits for the KV ...
        var first = new DecodeRequest { RequestId = 31, MaxNewTokens = 4 };
        first.Prompt.Add(prompt);
        Task<int> firstTokens = Task.Run(async () =>
        {
            int n = 0;
            await using var stream = client.Decode(first, call);
            while (await stream.ReadAsync() is { } m)
                n += m.Tokens.Count;
            return n;
        });
        for (int i = 0; i < 400 && (await client.StatusAsync(call)).Active == 0; i++)
            await Task.Delay(25);
        await Task.Delay(200); // from counted as active to waiting on the hand-off: no await in between

        // ... while duplicates of it come: a bad one (refused before it waits) and a good one.
        await using (var stream = client.Decode(new DecodeRequest { RequestId = 31, MaxNewTokens = 4 }, call))
            Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(async () => await stream.ReadAsync())).Status);
        var duplicate = new DecodeRequest { RequestId = 31, MaxNewTokens = 4 };
        duplicate.Prompt.Add(prompt);
        await using (var stream = client.Decode(duplicate, call))
            Assert.Equal(StatusCode.AlreadyExists, (await Assert.ThrowsAsync<RpcException>(async () => await stream.ReadAsync())).Status);

        // Neither took the first one's reservation: its KV lands, and it decodes.
        Assert.True((await rig.SendAsync(t)).IsSuccess);
        Assert.Equal(4, await firstTokens);
        WorkerStatus status = await client.StatusAsync(call);
        Assert.Equal(status.HandoffSlotsTotal, status.HandoffSlotsFree);
    }

    [Fact]
    public async Task A_decode_asking_for_no_tokens_or_too_many_is_refused_at_once_and_gives_the_reservation_back()
    {
        await using var rig = await DecodeRig.StartAsync(kvBlocks: 64);
        WorkerClient client = rig.Client;
        var call = new CallOptions(TimeSpan.FromSeconds(60), CancellationToken.None);
        int tpb = ModelConfigs.Tiny.TokensPerBlock;
        int[] prompt = [.. Enumerable.Range(1, 2 * tpb)];
        foreach (uint maxNew in new[] { 0u, (uint)(ModelConfigs.Tiny.MaxPositions - prompt.Length + 2) })
        {
            // No KV is ever sent: the answer must not wait for it (up to the lease).
            await client.ReserveAsync(41, prompt.Length, call);
            var request = new DecodeRequest { RequestId = 41, MaxNewTokens = maxNew };
            request.Prompt.Add(prompt);
            using var quick = new CancellationTokenSource(TimeSpan.FromSeconds(30)); // the lease is 60 s: without the check, it waits that long
            await using (var stream = client.Decode(request, new CallOptions(TimeSpan.FromSeconds(60), quick.Token)))
                Assert.Equal(StatusCode.InvalidArgument, (await Assert.ThrowsAsync<RpcException>(async () => await stream.ReadAsync())).Status);
        }
    }

    [Fact]
    public async Task A_reservation_asking_for_a_lease_beyond_an_hour_is_refused_and_holds_nothing()
    {
        await using var rig = await DecodeRig.StartAsync(kvBlocks: 64);
        var call = new CallOptions(TimeSpan.FromSeconds(20), CancellationToken.None);
        var reserve = new ReserveHandoffRequest { RequestId = 51, PromptTokens = (uint)ModelConfigs.Tiny.TokensPerBlock, LeaseMs = uint.MaxValue };
        RpcException e = await Assert.ThrowsAsync<RpcException>(() =>
            rig.Client.Channel.UnaryAsync("/kvfabric.v1.Worker/Reserve", reserve, ReserveHandoffResponse.Parser, call));
        Assert.Equal(StatusCode.InvalidArgument, e.Status);
        Assert.Contains("lease_ms", e.Message, StringComparison.Ordinal);
        WorkerStatus status = await rig.Client.StatusAsync(call);
        Assert.Equal(status.HandoffSlotsTotal, status.HandoffSlotsFree);

        reserve.LeaseMs = 3_600_000; // an hour is fine
        Assert.Equal(3_600_000u, (await rig.Client.Channel.UnaryAsync("/kvfabric.v1.Worker/Reserve", reserve, ReserveHandoffResponse.Parser, call)).Ticket.LeaseMs);
    }

    /// <summary>A response body whose client reset the stream: the first bytes sent find it gone.</summary>
    private sealed class GoneClient(CancellationTokenSource aborted) : KvFabric.Tests.Rpc.TestStream
    {
        public override bool CanWrite => true;
        public override void Write(byte[] buffer, int offset, int count) => throw Gone();
        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default) => throw Gone();
        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => throw Gone();

        private IOException Gone()
        {
            aborted.Cancel();
            return new IOException("the client reset the stream");
        }
    }

    /// <summary>A decode worker in this process, and a test transfer agent with registered blocks standing in for the prefill side.</summary>
    private sealed class DecodeRig : IAsyncDisposable
    {
        private WorkerServer _server = null!;
        private TransferAgent _sender = null!;
        private HostBlockPool _blocks = null!;

        public WorkerClient Client { get; private set; } = null!;
        public WorkerServer Server => _server;

        public static async Task<DecodeRig> StartAsync(int kvBlocks)
        {
            var options = new WorkerOptions { Role = WorkerRole.Decode, Name = "decode-test", Model = "tiny", KvBlocks = kvBlocks, HandoffSlots = 8 };
            var rig = new DecodeRig { _server = new WorkerServer(options, NullLoggerFactory.Instance) };
            await rig._server.StartAsync();
            rig.Client = new WorkerClient(options.Name, $"http://{rig._server.Endpoint}", options.Tenant, options.Token);
            rig._sender = new TransferAgent(new TransferAgentOptions { Name = "prefill-test" });
            rig._blocks = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = checked((int)ModelConfigs.Tiny.ToKvLayout().BlockBytes), SlotCount = 4, Tag = "test-kv" });
            rig._sender.Register(rig._blocks);
            return rig;
        }

        /// <summary>WRITEs registered (arbitrary) bytes into every slot of the reservation, with its notification.</summary>
        public async Task<TransferResult> SendAsync(HandoffReservation t)
        {
            RemoteAgent receiver = await _sender.LoadRemoteAsync(t.AgentMetadata.Memory);
            var ticket = new HandoffTicket(t.RequestId, t.Nonce, new Guid(t.ReceiverAgent.Span), [.. t.Addresses], (int)t.BlockBytes, TimeSpan.FromMilliseconds(t.LeaseMs));
            return await HandoffSender.SendAsync(_sender, receiver, ticket, t.Addresses.Select(_ => _blocks.SlotAt(0).Address).ToArray(), backend: BackendKind.Tcp);
        }

        public async ValueTask DisposeAsync()
        {
            Client.Dispose();
            await _sender.DisposeAsync();
            _blocks.Dispose();
            await _server.DisposeAsync();
        }
    }

    /// <summary>
    /// A decode worker and a prefill worker in this process, with clients. No sidecar listens where the prefill worker
    /// looks for one: it computes the whole prompt (a fallback), which is all these tests need.
    /// </summary>
    private sealed class WorkerPair : IAsyncDisposable
    {
        private WorkerServer? _decode, _prefill;
        public WorkerClient DecodeClient { get; private set; } = null!;
        public WorkerClient PrefillClient { get; private set; } = null!;

        public static async Task<WorkerPair> StartAsync()
        {
            var pair = new WorkerPair();
            try
            {
                pair._decode = new WorkerServer(new WorkerOptions { Role = WorkerRole.Decode, Name = "decode-test", Model = "tiny", KvBlocks = 64, HandoffSlots = 8 },
                    NullLoggerFactory.Instance);
                await pair._decode.StartAsync();
                pair._prefill = new WorkerServer(new WorkerOptions { Role = WorkerRole.Prefill, Name = "prefill-test", Model = "tiny", KvBlocks = 64, Sidecar = "http://127.0.0.1:1" },
                    NullLoggerFactory.Instance);
                await pair._prefill.StartAsync();
                pair.DecodeClient = new WorkerClient("decode-test", $"http://{pair._decode.Endpoint}", "dev", "dev");
                pair.PrefillClient = new WorkerClient("prefill-test", $"http://{pair._prefill.Endpoint}", "dev", "dev");
                return pair;
            }
            catch
            {
                await pair.DisposeAsync();
                throw;
            }
        }

        public async ValueTask DisposeAsync()
        {
            DecodeClient?.Dispose();
            PrefillClient?.Dispose();
            if (_prefill is not null)
                await _prefill.DisposeAsync();
            if (_decode is not null)
                await _decode.DisposeAsync();
        }
    }
}
