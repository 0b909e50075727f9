using System.Runtime.InteropServices;

namespace KvFabric.Compression;

/// <summary>
/// zstd through the machine's libzstd.so.1 (Debian libzstd1). One compression and one decompression context per thread,
/// reused across calls, so the hot path allocates nothing.
/// </summary>
public static partial class Zstd
{
    private const string Library = "libzstd.so.1";
    private static readonly Lazy<string?> Problem = new(Probe);

    [ThreadStatic] private static ContextHandle? t_compress;
    [ThreadStatic] private static ContextHandle? t_decompress;

    public static int MinLevel => ZSTD_minCLevel();
    public static int MaxLevel => ZSTD_maxCLevel();

    public static bool IsAvailable => Problem.Value is null;

    /// <summary>Fails early, with the fix, when libzstd is missing.</summary>
    public static void EnsureAvailable()
    {
        if (Problem.Value is { } problem)
            throw new InvalidOperationException(problem);
    }

    /// <summary>The largest compressed size of <paramref name="sourceLength"/> bytes (a destination this big never fails).</summary>
    public static int CompressBound(int sourceLength) => checked((int)ZSTD_compressBound((nuint)sourceLength));

    /// <summary>
    /// Compresses into destination; false when the result would not fit (zstd reports dstSize_tooSmall), so a caller can pass
    /// a destination sized to the largest result worth keeping and let zstd give up early.
    /// </summary>
    public static unsafe bool TryCompress(ReadOnlySpan<byte> source, Span<byte> destination, int level, out int written)
    {
        var ctx = t_compress ??= new ContextHandle(ZSTD_createCCtx(), compress: true);
        nuint r;
        fixed (byte* s = source)
        fixed (byte* d = destination)
            r = ZSTD_compressCCtx(ctx.DangerousGetHandle(), d, (nuint)destination.Length, s, (nuint)source.Length, level);
        if (ZSTD_isError(r) != 0)
        {
            written = 0;
            if (ZSTD_getErrorCode(r) == ErrorDstSizeTooSmall)
                return false;
            throw new InvalidOperationException($"zstd compression of {source.Length} bytes at level {level} failed: {ErrorName(r)}");
        }
        written = (int)r;
        return true;
    }

    /// <summary>Decompresses a whole frame; returns the decompressed length. Throws InvalidDataException on a bad frame.</summary>
    public static unsafe int Decompress(ReadOnlySpan<byte> source, Span<byte> destination)
    {
        var ctx = t_decompress ??= new ContextHandle(ZSTD_createDCtx(), compress: false);
        nuint r;
        fixed (byte* s = source)
        fixed (byte* d = destination)
            r = ZSTD_decompressDCtx(ctx.DangerousGetHandle(), d, (nuint)destination.Length, s, (nuint)source.Length);
        if (ZSTD_isError(r) != 0)
            throw new InvalidDataException($"zstd could not decompress a {source.Length}-byte frame into {destination.Length} bytes: {ErrorName(r)}");
        return (int)r;
    }

    private static string ErrorName(nuint code) => Marshal.PtrToStringUTF8(ZSTD_getErrorName(code)) ?? $"error {code}";

    private static string? Probe()
    {
        try
        {
            _ = ZSTD_compressBound(0);
            return null;
        }
        catch (DllNotFoundException)
        {
            return "zstd compression needs libzstd.so.1 (Debian package libzstd1: apt-get install -y libzstd1), or turn compression off";
        }
    }

    // ZSTD_ErrorCode.ZSTD_error_dstSize_tooSmall in zstd_errors.h (stable since 1.3).
    private const int ErrorDstSizeTooSmall = 70;

    private sealed class ContextHandle : SafeHandle
    {
        private readonly bool _compress;

        public ContextHandle(nint handle, bool compress) : base(0, ownsHandle: true)
        {
            if (handle == 0)
                throw new OutOfMemoryException("libzstd could not allocate a (de)compression context");
            SetHandle(handle);
            _compress = compress;
        }

        public override bool IsInvalid => handle == 0;

        protected override bool ReleaseHandle()
        {
            _ = _compress ? ZSTD_freeCCtx(handle) : ZSTD_freeDCtx(handle);
            return true;
        }
    }

    [LibraryImport(Library)] private static partial nuint ZSTD_compressBound(nuint srcSize);
    [LibraryImport(Library)] private static partial uint ZSTD_isError(nuint code);
    [LibraryImport(Library)] private static partial int ZSTD_getErrorCode(nuint functionResult);
    [LibraryImport(Library)] private static partial nint ZSTD_getErrorName(nuint code);
    [LibraryImport(Library)] private static partial int ZSTD_minCLevel();
    [LibraryImport(Library)] private static partial int ZSTD_maxCLevel();
    [LibraryImport(Library)] private static partial nint ZSTD_createCCtx();
    [LibraryImport(Library)] private static partial nuint ZSTD_freeCCtx(nint cctx);
    [LibraryImport(Library)] private static partial nint ZSTD_createDCtx();
    [LibraryImport(Library)] private static partial nuint ZSTD_freeDCtx(nint dctx);
    [LibraryImport(Library)] private static unsafe partial nuint ZSTD_compressCCtx(nint cctx, byte* dst, nuint dstCapacity, byte* src, nuint srcSize, int level);
    [LibraryImport(Library)] private static unsafe partial nuint ZSTD_decompressDCtx(nint dctx, byte* dst, nuint dstCapacity, byte* src, nuint srcSize);
}
