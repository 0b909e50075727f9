using System.Collections.Concurrent;
using System.Globalization;
using FASTER.core;
using KvFabric.Native;
using Microsoft.Win32.SafeHandles;

namespace KvFabric.Tiers.Ssd;

/// <summary>
/// FASTER log device on plain segment files opened O_DIRECT | O_DSYNC: a write completes once its bytes are on stable
/// storage (no fsync round trip, no page-cache copy), and reads come from the disk, not from a page cache the inference
/// engine needs. FASTER's own ManagedLocalStorageDevice asks .NET for unbuffered I/O with a Windows-only flag that Linux
/// ignores (it gets O_SYNC through the page cache, about 4x slower here, docs/tiers-ssd.md). A large flush is split into
/// chunks written in parallel, so the disk sees a queue depth above 1, as fio does.
/// </summary>
internal sealed class DirectFileDevice : StorageDeviceBase
{
    internal const int O_DSYNC = 0x1000; // 010000 on every Linux architecture .NET runs on

    /// <summary>O_DIRECT of the process's architecture (its system-call ABI): 040000 in the generic ABI (x86-64, RISC-V,
    /// LoongArch, s390x), but 0200000 on arm and arm64, where 040000 is O_DIRECTORY (opening a segment then failed with
    /// ENOTDIR and every file fell back to the page cache), and 0400000 on ppc64le.</summary>
    internal static readonly int O_DIRECT =
        DirectFlag(System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture);

    internal static int DirectFlag(System.Runtime.InteropServices.Architecture architecture) => architecture switch
    {
        System.Runtime.InteropServices.Architecture.Arm64 or System.Runtime.InteropServices.Architecture.Arm => 0x10000,
        System.Runtime.InteropServices.Architecture.Ppc64le => 0x20000,
        _ => 0x4000,
    };
    private const uint IoError = 5; // EIO: FASTER only needs a non-zero code; LastError has the real message

    /// <summary>The HResult of an IOException for a write the file system had no room for (ENOSPC, or EDQUOT: a quota),
    /// which .NET sets to the errno: space can come back, unlike a device error.</summary>
    internal const int NoSpace = 28;
    internal const int QuotaExceeded = 122; // EDQUOT

    internal static bool IsNoSpace(Exception e) => e is IOException { HResult: NoSpace or QuotaExceeded };
    internal const int ChunkBytes = 4 << 20;

    // Blocking pread/pwrite run on the device's own threads: on the thread pool they starved the commit and writer
    // continuations (2 cores here), adding 10-20 ms to each group commit.
    private const int IoThreads = 8;
    private readonly Thread[] _threads;
    private readonly BlockingCollection<Queued> _work = new(boundedCapacity: 1024);

    private abstract class IoWork
    {
        public abstract void Run(int part);
    }

    private readonly record struct Queued(IoWork Work, int Part);

    private readonly ConcurrentDictionary<int, SafeFileHandle> _handles = new();
    private readonly ConcurrentBag<AlignedBuffer> _buffers = [];
    private readonly int _readBufferBytes;
    private const int PooledBuffers = 32;
    private readonly object _openLock = new();
    private volatile string? _lastError;

    private readonly long _preallocateBytes;
    private readonly int _maxSpares;
    private readonly List<string> _spares = []; // segment files kept for reuse (under _openLock)
    private bool _directoryUnsynced;            // a segment file was created, or a spare renamed, and the directory sync failed (under _openLock)

    /// <param name="preallocateBytes">When positive, a new segment file is given this many bytes with fallocate before its
    /// first write: an O_DSYNC write that extends a file also commits the file system's journal (size and block allocation),
    /// which made appends to fresh files about 2.5x slower than writes into allocated space here (fio, docs/tiers-ssd.md).</param>
    /// <param name="maxSpares">Segment files <see cref="RecycleSegment"/> keeps (renamed FileName.spare.N) for new segments to
    /// reuse, so that writes go to space the disk has already allocated and written, as an overwrite does.</param>
    public DirectFileDevice(string fileName, uint sectorSize, int readBufferBytes, long preallocateBytes = 0, int maxSpares = 0) : base(fileName, sectorSize, Devices.CAPACITY_UNSPECIFIED)
    {
        _preallocateBytes = preallocateBytes;
        _maxSpares = maxSpares;
        _readBufferBytes = (int)((readBufferBytes + 2L * sectorSize + sectorSize - 1) / sectorSize * sectorSize);
        string dir = Path.GetDirectoryName(fileName)!;
        string prefix = Path.GetFileName(fileName) + ".";
        var segments = System.IO.Directory.EnumerateFiles(dir, prefix + "*")
            .Select(f => int.TryParse(Path.GetFileName(f).AsSpan(prefix.Length), NumberStyles.None, CultureInfo.InvariantCulture, out int n) ? n : -1)
            .Where(n => n >= 0).ToArray();
        if (segments.Length > 0)
        {
            startSegment = segments.Min();
            endSegment = segments.Max();
        }
        _spares.AddRange(System.IO.Directory.EnumerateFiles(dir, prefix + "spare.*").Order(StringComparer.Ordinal));
        _threads = new Thread[IoThreads];
        for (int i = 0; i < IoThreads; i++)
        {
            _threads[i] = new Thread(IoLoop) { IsBackground = true, Name = $"kvfabric-ssd-io-{i}" };
            _threads[i].Start();
        }
    }

    private void IoLoop()
    {
        foreach (var q in _work.GetConsumingEnumerable())
            q.Work.Run(q.Part);
    }

    /// <summary>The last I/O error, with the file it happened on (FASTER passes on only a code).</summary>
    public string? LastError => _lastError;

    /// <summary>False when the file system refused O_DIRECT and the device fell back to O_DSYNC through the page cache.</summary>
    public bool Direct { get; private set; } = true;

    private string SegmentPath(int segment) => FileName + "." + segment.ToString(CultureInfo.InvariantCulture);

    private SafeFileHandle Handle(int segment, bool create = true)
    {
        if (_handles.TryGetValue(segment, out var h))
            return h;
        lock (_openLock)
        {
            if (_handles.TryGetValue(segment, out h))
                return h;
            string path = SegmentPath(segment);
            // A read of a segment compaction has just deleted must fail (and be retried at the block's new place), not
            // bring back an empty, preallocated file: a read opens without O_CREAT (checking File.Exists first raced
            // with RemoveSegment, which recreated the file).
            bool exists = File.Exists(path);
            if (!create && !exists)
                throw new IOException($"segment {path} does not exist (freed by compaction?)");
            if (create && !exists && TakeSpare(segment) is { } spare)
            {
                // A spare becomes this segment. It only ever moves up: the records left in it are sealed for addresses
                // of its earlier segments, all below this one's, so a recovery scan never takes them for records here.
                try
                {
                    File.Move(spare, path);
                }
                catch (IOException)
                {
                    // The spare is gone or unusable: a new file it is.
                }
            }
            int flags = Libc.O_RDWR | Libc.O_CLOEXEC | O_DSYNC | (create ? Libc.O_CREAT : 0);
            int fd = Direct ? Libc.Open(path, flags | O_DIRECT, 0x1A4) : -1;
            if (fd < 0)
            {
                // EINVAL: this file system does not do O_DIRECT (tmpfs before Linux 6.6, some FUSE). Durability stays (O_DSYNC).
                fd = Libc.Open(path, flags, 0x1A4);
                if (fd < 0)
                    throw new IOException($"cannot open segment {path}: {Libc.LastError()}");
                Direct = false;
            }
            if (_preallocateBytes > 0 && create)
                _ = Libc.Fallocate(fd, 0, 0, _preallocateBytes); // best effort: a full disk shows up as the write's ENOSPC
            h = new SafeFileHandle(fd, ownsHandle: true);
            if (!exists || _directoryUnsynced)
            {
                // O_DSYNC makes a write's data and the file's size durable, not the new file's name: sync the directory
                // before the first write into it can complete, or a crash could leave acknowledged records in a file
                // that has no name. Also when an earlier sync failed: the file it created is there now (the next write
                // into it finds it existing), but its name may not be on stable storage.
                try
                {
                    if (DirectorySyncFault?.Invoke() is { } fault)
                        throw new IOException($"fsync of directory {Path.GetDirectoryName(path)} failed: {fault}");
                    SyncDirectory(Path.GetDirectoryName(path)!);
                    _directoryUnsynced = false;
                }
                catch
                {
                    _directoryUnsynced = true;
                    h.Dispose();
                    throw;
                }
            }
            _handles[segment] = h;
            return h;
        }
    }

    public override unsafe void WriteAsync(IntPtr sourceAddress, int segmentId, ulong destinationAddress, uint numBytesToWrite, DeviceIOCompletionCallback callback, object context)
    {
        int chunks = (int)((numBytesToWrite + ChunkBytes - 1) / ChunkBytes);
        var op = new WriteOp(this, sourceAddress, segmentId, (long)destinationAddress, numBytesToWrite, chunks, callback, context);
        for (int c = 0; c < chunks; c++)
            _work.Add(new Queued(op, c));
    }

    private sealed class WriteOp(DirectFileDevice device, nint source, int segment, long offset, uint length, int chunks, DeviceIOCompletionCallback callback, object context)
        : IoWork
    {
        public override void Run(int part) => WriteChunk(part);

        private int _remaining = chunks;
        private int _failed;

        public unsafe void WriteChunk(int chunk)
        {
            long start = (long)chunk * ChunkBytes;
            int n = (int)Math.Min(ChunkBytes, length - start);
            try
            {
                RandomAccess.Write(device.Handle(segment), new ReadOnlySpan<byte>((byte*)source + start, n), offset + start);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or ObjectDisposedException)
            {
                device._lastError = $"writing {n} bytes at {offset + start} of {device.SegmentPath(segment)}: {e.Message}";
                // The error code the callback gets: ENOSPC when the file system was full; EIO when any chunk hit a device
                // error, whatever the other chunks got (a device error stops writes, a full disk only pauses them).
                if (IsNoSpace(e))
                    Interlocked.CompareExchange(ref _failed, NoSpace, 0);
                else
                    Volatile.Write(ref _failed, (int)IoError);
            }
            if (Interlocked.Decrement(ref _remaining) == 0)
            {
                int failed = Volatile.Read(ref _failed);
                callback((uint)failed, failed == 0 ? length : 0, context);
            }
        }
    }

    public override void ReadAsync(int segmentId, ulong sourceAddress, IntPtr destinationAddress, uint readLength, DeviceIOCompletionCallback callback, object context)
    {
        _work.Add(new Queued(new ReadOp(this, segmentId, sourceAddress, destinationAddress, readLength, callback, context, Create: true), 0));
    }

    private sealed class ReadOp(DirectFileDevice device, int segmentId, ulong sourceAddress, IntPtr destination, uint length, DeviceIOCompletionCallback callback, object context, bool Create)
        : IoWork
    {
        public override void Run(int part) => device.Read(segmentId, sourceAddress, destination, length, callback, context, Create);
    }

    private unsafe void Read(int segmentId, ulong sourceAddress, IntPtr destination, uint length, DeviceIOCompletionCallback callback, object context, bool create)
    {
        try
        {
            var span = new Span<byte>((void*)destination, (int)length);
            int total = 0;
            while (total < span.Length)
            {
                int n = RandomAccess.Read(Handle(segmentId, create), span[total..], (long)sourceAddress + total);
                if (n == 0)
                    break;
                total += n;
            }
            span[total..].Clear(); // past the end of the file: FASTER reads whole sectors and treats zeros as padding
            callback(0, length, context);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ObjectDisposedException)
        {
            _lastError = $"reading {length} bytes at {sourceAddress} of {SegmentPath(segmentId)}: {e.Message}";
            callback(IoError, 0, context);
        }
    }

    /// <summary>
    /// Reads [offset, offset + length) of a segment (sector-aligned) into a pooled aligned buffer, on the device threads.
    /// The store's read path: one pread into memory it verifies in place, instead of FASTER's read (which clears a
    /// staging buffer and copies twice; 10% of the CPU of a read-heavy profile).
    /// </summary>
    /// <summary>Tests: asked before each ReadAlignedAsync (with whether it is a recovery scan's read); a message fails
    /// that read (see SsdBlockStoreOptions.DataReadFault).</summary>
    internal Func<bool, string?>? ReadFault { get; init; }

    /// <summary>Tests: asked before each WriteAlignedAsync; a message fails that write (see SsdBlockStoreOptions.DataWriteFault).</summary>
    internal Func<string?>? WriteFault { get; init; }

    /// <summary>Tests: asked before the directory is synced for a segment file just created; a message fails that sync.</summary>
    internal Func<string?>? DirectorySyncFault { get; init; }

    public Task ReadAlignedAsync(int segment, long offset, AlignedBuffer buffer, int length, bool scan = false)
    {
        if (ReadFault?.Invoke(scan) is { } fault)
            return Task.FromException(new IOException(fault));
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        unsafe
        {
            _work.Add(new Queued(new ReadOp(this, segment, (ulong)offset, (nint)buffer.Pointer, (uint)length, static (error, _, context) =>
            {
                var (device, tcs) = ((DirectFileDevice, TaskCompletionSource))context;
                if (error == 0)
                    tcs.TrySetResult();
                else
                    tcs.TrySetException(new IOException(device.LastError ?? $"read failed with error {error}"));
            }, (this, done), Create: false), 0));
        }
        return done.Task;
    }

    /// <summary>Writes [0, length) of an aligned buffer at a sector-aligned offset of a segment, on the device threads;
    /// durable when the task completes (O_DSYNC). A write over ChunkBytes is split into chunks written in parallel.
    /// The awaiting code continues on the thread pool, never on a device thread: it may be the caller's code, which
    /// must neither hold up the device's I/O nor dispose the device from one of its own threads.</summary>
    public Task WriteAlignedAsync(int segment, long offset, AlignedBuffer buffer, int length)
    {
        if (WriteFault?.Invoke() is { } fault)
        {
            _lastError = $"writing {length} bytes at {offset} of {SegmentPath(segment)}: {fault}";
            // A message that starts with ENOSPC stands for a full file system.
            return Task.FromException(new IOException(_lastError, fault.StartsWith("ENOSPC", StringComparison.Ordinal) ? NoSpace : (int)IoError));
        }
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        unsafe
        {
            WriteAsync((nint)buffer.Pointer, segment, (ulong)offset, (uint)length, static (error, _, context) =>
            {
                var (device, tcs) = ((DirectFileDevice, TaskCompletionSource))context;
                if (error == 0)
                    tcs.TrySetResult();
                else
                    tcs.TrySetException(new IOException(device.LastError ?? $"write failed with error {error}", (int)error));
            }, (this, done));
        }
        return done.Task;
    }

    public AlignedBuffer RentBuffer(int length)
    {
        if (length <= _readBufferBytes && _buffers.TryTake(out var b))
            return b;
        return new AlignedBuffer(this, Math.Max(length, _readBufferBytes), SectorSize);
    }

    private void Return(AlignedBuffer b)
    {
        if (b.Capacity == _readBufferBytes && _buffers.Count < PooledBuffers && !_closed)
            _buffers.Add(b);
        else
            b.Free(); // after Dispose too: a buffer returned late is freed, not pooled
    }

    /// <summary>Native memory aligned for O_DIRECT; Dispose gives it back to the device's small pool.</summary>
    internal sealed unsafe class AlignedBuffer : IDisposable
    {
        private readonly DirectFileDevice _device;

        public AlignedBuffer(DirectFileDevice device, int capacity, uint alignment)
        {
            _device = device;
            Capacity = capacity;
            Pointer = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)capacity, alignment);
        }

        public byte* Pointer { get; private set; }
        public int Capacity { get; }
        public ReadOnlySpan<byte> Span(int start, int length) => new(Pointer + start, length);
        public Span<byte> WritableSpan(int start, int length) => new(Pointer + start, length);
        public void Dispose() => _device.Return(this);

        internal void Free()
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree(Pointer);
            Pointer = null;
        }
    }

    /// <summary>
    /// Retires segments (see <see cref="RecycleSegment"/>) and syncs their directory on the device's threads: renames and
    /// fsync are blocking calls of a few milliseconds each, which on the thread pool held up timers and continuations of a
    /// 2-core process. Complete when the retirements are on stable storage.
    /// </summary>
    public Task RetireSegmentsAsync(IReadOnlyList<int> segments)
    {
        var work = new RetireWork(this, segments);
        _work.Add(new Queued(work, 0));
        return work.Done.Task;
    }

    private sealed class RetireWork(DirectFileDevice device, IReadOnlyList<int> segments) : IoWork
    {
        public TaskCompletionSource Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public override void Run(int part)
        {
            try
            {
                foreach (int segment in segments)
                    device.RecycleSegment(segment);
                SyncDirectory(Path.GetDirectoryName(device.FileName)!);
                Done.TrySetResult();
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                Done.TrySetException(e);
            }
        }
    }

    /// <summary>fsync of a directory: the files created, renamed or removed in it are on stable storage when it returns.</summary>
    internal static void SyncDirectory(string dir)
    {
        int fd = Libc.Open(dir, Libc.O_RDONLY | Libc.O_CLOEXEC, 0);
        if (fd < 0)
            throw new IOException($"cannot open directory {dir} to sync it: {Libc.LastError()}");
        try
        {
            if (Libc.Fsync(fd) != 0)
                throw new IOException($"fsync of directory {dir} failed: {Libc.LastError()}");
        }
        finally
        {
            Libc.Close(fd);
        }
    }

    public override void RemoveSegmentAsync(int segment, AsyncCallback callback, IAsyncResult result)
    {
        RemoveSegment(segment);
        callback(result);
    }

    /// <summary>Retires a segment: kept as a spare for a later segment (renamed, its handle closed) while fewer than
    /// maxSpares are kept, else deleted. The caller syncs the directory before relying on it.</summary>
    public void RecycleSegment(int segment)
    {
        lock (_openLock)
        {
            string path = SegmentPath(segment);
            string spare = FileName + ".spare." + segment.ToString(CultureInfo.InvariantCulture);
            if (_spares.Count >= _maxSpares || !File.Exists(path) || File.Exists(spare))
            {
                RemoveSegment(segment);
                return;
            }
            if (_handles.TryRemove(segment, out var h))
                h.Dispose();
            File.Move(path, spare);
            _spares.Add(spare);
        }
    }

    // Under _openLock: the spare of the highest origin below this segment (a spare named spare.K holds records sealed for
    // segment K and earlier ones), removed from the list; null when none qualifies.
    private string? TakeSpare(int segment)
    {
        int best = -1, bestOrigin = -1;
        for (int i = 0; i < _spares.Count; i++)
        {
            int origin = Origin(_spares[i]);
            if (origin >= 0 && origin < segment && origin > bestOrigin)
                (best, bestOrigin) = (i, origin);
        }
        if (best < 0)
            return null;
        string spare = _spares[best];
        _spares.RemoveAt(best);
        return spare;
    }

    private static int Origin(string sparePath) =>
        int.TryParse(sparePath.AsSpan(sparePath.LastIndexOf('.') + 1), NumberStyles.None, CultureInfo.InvariantCulture, out int n) ? n : -1;

    public override void RemoveSegment(int segment)
    {
        // Under the open lock: a read opening the segment meanwhile either finds it (and its handle is closed here) or
        // finds it gone; it never caches a descriptor of the unlinked file, which would keep its space allocated.
        lock (_openLock)
        {
            if (_handles.TryRemove(segment, out var h))
                h.Dispose();
            File.Delete(SegmentPath(segment));
        }
    }

    public override long GetFileSize(int segment)
    {
        var info = new FileInfo(SegmentPath(segment));
        return info.Exists ? info.Length : 0;
    }

    private volatile bool _closed;

    public override void Dispose()
    {
        _closed = true;
        _work.CompleteAdding();
        foreach (var t in _threads)
        {
            if (t != Thread.CurrentThread) // disposed from a callback on a device thread: the others still finish the queue
                t.Join();
        }
        _work.Dispose();
        while (_buffers.TryTake(out var b))
            b.Free();
        foreach (var h in _handles.Values)
            h.Dispose();
        _handles.Clear();
    }
}
