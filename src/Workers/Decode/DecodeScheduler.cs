using System.Threading.Channels;
using KvFabric.Workers.Model;

namespace KvFabric.Workers.Decode;

/// <summary>The scheduler takes no more sequences (its loop failed, or it is stopping): the request belongs on another worker.</summary>
public sealed class DecodeUnavailableException(string message, Exception? inner) : InvalidOperationException(message, inner);

/// <summary>A generated token as the scheduler streams it: its index in the output, and when it was made.</summary>
public readonly record struct GeneratedToken(int Index, int Token, long TimestampTicks);

/// <summary>
/// Continuous batching for a decode worker: sequences join between steps, every step decodes all active sequences in
/// one <see cref="Transformer.DecodeBatch"/> (bit-identical to decoding each alone), each sequence's tokens stream out
/// on its own channel, and a finished or cancelled sequence leaves at the next step and its KV cache is disposed (its
/// blocks go back to their pool). Bounded: at most MaxBatch active sequences and MaxWaiting queued; every token channel
/// is bounded by the sequence's own length.
/// </summary>
public sealed class DecodeScheduler : IAsyncDisposable
{
    private readonly Transformer _model;
    private readonly Channel<Sequence> _incoming;
    private readonly List<Sequence> _active = [];
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;
    private readonly HashSet<KvCache> _owned = new(ReferenceEqualityComparer.Instance);
    private long _steps, _batchedTokens;

    private sealed class Sequence(KvCache cache, float[] logits, int maxNewTokens, Sampler sampler, CancellationToken cancellation)
    {
        public readonly KvCache Cache = cache;
        public readonly float[] Logits = logits;
        public readonly int MaxNewTokens = maxNewTokens;
        public readonly Sampler Sampler = sampler;
        public readonly CancellationToken Cancellation = cancellation;
        public readonly Channel<GeneratedToken> Tokens = Channel.CreateBounded<GeneratedToken>(new BoundedChannelOptions(Math.Max(1, maxNewTokens))
        {
            SingleReader = true, SingleWriter = true,
        });
        public int Produced;
        public int Next;
        public int State;                                  // Waiting, Joined or Abandoned (Interlocked)
        public CancellationTokenRegistration WhileWaiting; // abandons it if cancelled before it joins
    }

    private const int Waiting = 0, Joined = 1, Abandoned = 2;

    private readonly TimeSpan _stepDelay;

    /// <param name="stepDelay">Fault injection (tests): a sleep after every step, as a slow accelerator would take.</param>
    public DecodeScheduler(Transformer model, int maxBatch = 16, int maxWaiting = 256, TimeSpan stepDelay = default)
    {
        _stepDelay = stepDelay;
        ArgumentOutOfRangeException.ThrowIfLessThan(maxBatch, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxWaiting, 1);
        _model = model;
        MaxBatch = maxBatch;
        _incoming = Channel.CreateBounded<Sequence>(new BoundedChannelOptions(maxWaiting) { SingleReader = true });
        _loop = Task.Factory.StartNew(RunAsync, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default).Unwrap();
    }

    public int MaxBatch { get; }
    public long Steps => Interlocked.Read(ref _steps);
    /// <summary>Mean sequences per step so far (how much batching happened).</summary>
    public double MeanBatch => Steps == 0 ? 0 : (double)Interlocked.Read(ref _batchedTokens) / Steps;

    /// <summary>
    /// Adds a sequence whose prompt is in cache and whose last-prompt-token logits are given; once this returns, the
    /// scheduler owns the cache (disposes it when the sequence ends); if it throws, the cache stays the caller's. Tokens
    /// stream on the returned reader, which completes after the last one (or with the cancellation's or failure's exception).
    /// </summary>
    public async ValueTask<ChannelReader<GeneratedToken>> StartAsync(KvCache cache, ReadOnlyMemory<float> logits, int maxNewTokens, Sampler sampler,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(cache);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxNewTokens, 1);
        if (logits.Length != _model.Config.Vocab)
            throw new ArgumentException($"logits must have the vocabulary's {_model.Config.Vocab} entries; got {logits.Length}", nameof(logits));
        lock (_owned)
        {
            if (_owned.Contains(cache))
                throw new ArgumentException("this KV cache already belongs to a sequence of the scheduler", nameof(cache));
            // Every generated token but the last is appended to the cache: it must have room for them all.
            int room = Math.Min(_model.Config.MaxPositions, cache.MaxTokens) - cache.Length;
            if (maxNewTokens - 1 > room)
                throw new ArgumentException($"the sequence holds {cache.Length} tokens and may grow by {room}; {maxNewTokens} new tokens do not fit", nameof(maxNewTokens));
            _owned.Add(cache);
        }
        var s = new Sequence(cache, logits.ToArray(), maxNewTokens, sampler, cancellationToken);
        try
        {
            await _incoming.Writer.WriteAsync(s, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e)
        {
            // Not taken: the cache stays the caller's.
            lock (_owned)
                _owned.Remove(cache);
            if (e is ChannelClosedException)
            {
                // Not the channel's "The channel has been closed.": whoever reads it must know the worker decodes no more.
                throw _loop.IsFaulted
                    ? new DecodeUnavailableException($"this worker's decode loop failed ({_loop.Exception?.InnerException?.Message}) and takes no more sequences; restart the worker", _loop.Exception?.InnerException)
                    : new DecodeUnavailableException("this worker's decode scheduler is stopping and takes no more sequences; retry on another worker", null);
            }

            throw;
        }

        // Cancelled while it waits for room in a full batch: it ends, and its KV goes back, now, not when it would have joined
        // (after however long the active sequences run).
        s.WhileWaiting = cancellationToken.Register(static state =>
        {
            var (scheduler, waiting) = ((DecodeScheduler, Sequence))state!;
            if (Interlocked.CompareExchange(ref waiting.State, Abandoned, Waiting) == Waiting)
            {
                waiting.Tokens.Writer.TryComplete(new OperationCanceledException(waiting.Cancellation));
                scheduler.Disown(waiting.Cache);
            }
        }, (this, s));
        return s.Tokens.Reader;
    }

    private async Task RunAsync()
    {
        var tokens = new List<int>(MaxBatch);
        var caches = new List<KvCache>(MaxBatch);
        float[] logits = new float[MaxBatch * _model.Config.Vocab];
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                // Join whatever is waiting (up to the batch size); block only when nothing is active.
                if (_active.Count == 0 && !await _incoming.Reader.WaitToReadAsync(_stop.Token).ConfigureAwait(false))
                    return;
                while (_active.Count < MaxBatch && _incoming.Reader.TryRead(out Sequence? joined))
                {
                    if (Interlocked.CompareExchange(ref joined.State, Joined, Waiting) == Waiting)
                        _active.Add(joined); // else cancelled while it waited: already ended, its cache already disposed
                }

                // Sample each active sequence's next token from its logits, stream it, retire the finished.
                tokens.Clear();
                caches.Clear();
                for (int i = _active.Count - 1; i >= 0; i--)
                {
                    Sequence s = _active[i];
                    if (s.Cancellation.IsCancellationRequested)
                    {
                        Retire(i, new OperationCanceledException(s.Cancellation));
                        continue;
                    }

                    s.Next = s.Sampler.Sample(s.Logits);
                    s.Tokens.Writer.TryWrite(new GeneratedToken(s.Produced, s.Next, DateTime.UtcNow.Ticks)); // bounded by MaxNewTokens: never full
                    if (++s.Produced == s.MaxNewTokens)
                        Retire(i, null);
                }

                // Each sequence's next position gets its block now: one whose pool ran dry leaves alone, with the reason,
                // instead of failing the whole batch.
                for (int i = _active.Count - 1; i >= 0; i--)
                {
                    try
                    {
                        _active[i].Cache.Reserve(_active[i].Cache.Length + 1);
                    }
                    catch (InvalidOperationException e)
                    {
                        Retire(i, new InvalidOperationException($"the sequence cannot grow: {e.Message}", e));
                    }
                }

                if (_active.Count == 0)
                    continue;
                foreach (Sequence s in _active)
                {
                    tokens.Add(s.Next);
                    caches.Add(s.Cache);
                }

                int n = _active.Count;
                _model.DecodeBatch(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(tokens),
                    System.Runtime.InteropServices.CollectionsMarshal.AsSpan(caches), logits.AsSpan(0, n * _model.Config.Vocab));
                for (int i = 0; i < n; i++)
                    logits.AsSpan(i * _model.Config.Vocab, _model.Config.Vocab).CopyTo(_active[i].Logits);
                Interlocked.Increment(ref _steps);
                Interlocked.Add(ref _batchedTokens, n);
                // Between steps, let the threads that stream tokens out and take requests in run: on a CPU the worker
                // has to itself (pinned), this loop would otherwise hold it for a whole scheduler slice and tokens
                // would leave in bursts. Returns at once when nothing else is runnable.
                if (_stepDelay > TimeSpan.Zero)
                    Thread.Sleep(_stepDelay);
                else
                    Thread.Yield();
            }
        }
        catch (OperationCanceledException) when (_stop.IsCancellationRequested)
        {
            // stopping
        }
        catch (Exception e)
        {
            // Nothing more is taken; whatever was queued or active ends with the reason (below).
            _incoming.Writer.TryComplete(e);
            for (int i = _active.Count - 1; i >= 0; i--)
                Retire(i, new InvalidOperationException($"the decode loop failed: {e.Message}", e));
            throw;
        }
        finally
        {
            for (int i = _active.Count - 1; i >= 0; i--)
                Retire(i, new OperationCanceledException("the decode scheduler stopped"));
            _incoming.Writer.TryComplete();
            while (_incoming.Reader.TryRead(out Sequence? waiting))
            {
                waiting.Tokens.Writer.TryComplete(new OperationCanceledException("the decode scheduler stopped"));
                Disown(waiting.Cache);
            }
        }
    }

    private void Retire(int index, Exception? error)
    {
        Sequence s = _active[index];
        _active.RemoveAt(index);
        s.WhileWaiting.Dispose();
        s.Tokens.Writer.TryComplete(error);
        Disown(s.Cache);
    }

    private void Disown(KvCache cache)
    {
        bool mine;
        lock (_owned)
            mine = _owned.Remove(cache);
        if (mine)
            cache.Dispose(); // the blocks go back to their pool, once
    }

    public async ValueTask DisposeAsync()
    {
        _incoming.Writer.TryComplete();
        await _stop.CancelAsync().ConfigureAwait(false);
        try
        {
            await _loop.ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            // stopped
        }
        catch (Exception)
        {
            // The loop failed earlier: every sequence was told, and so is every StartAsync since; disposing (the worker's
            // shutdown, which still has its hand-off slots, agent and pool to free) goes on.
        }

        _stop.Dispose();
    }
}
