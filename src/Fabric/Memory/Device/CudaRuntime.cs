using System.Runtime.InteropServices;

namespace KvFabric.Memory.Device;

// The CUDA runtime calls the GPU tier needs (CUDA 12's libcudart.so.12). Return values are cudaError_t (0 = success).
internal static partial class CudaRuntime
{
    private const string Lib = "libcudart.so.12";

    internal const int MemcpyHostToDevice = 1, MemcpyDeviceToHost = 2;

    [LibraryImport(Lib, EntryPoint = "cudaGetDeviceCount")]
    internal static partial int GetDeviceCount(out int count);

    [LibraryImport(Lib, EntryPoint = "cudaSetDevice")]
    internal static partial int SetDevice(int device);

    [LibraryImport(Lib, EntryPoint = "cudaMalloc")]
    internal static partial int Malloc(out nint pointer, nuint bytes);

    [LibraryImport(Lib, EntryPoint = "cudaFree")]
    internal static partial int Free(nint pointer);

    [LibraryImport(Lib, EntryPoint = "cudaMemcpyAsync")]
    internal static partial int MemcpyAsync(nint destination, nint source, nuint bytes, int kind, nint stream);

    [LibraryImport(Lib, EntryPoint = "cudaStreamCreate")]
    internal static partial int StreamCreate(out nint stream);

    [LibraryImport(Lib, EntryPoint = "cudaStreamSynchronize")]
    internal static partial int StreamSynchronize(nint stream);

    [LibraryImport(Lib, EntryPoint = "cudaStreamDestroy")]
    internal static partial int StreamDestroy(nint stream);

    [LibraryImport(Lib, EntryPoint = "cudaEventCreate")]
    internal static partial int EventCreate(out nint e);

    [LibraryImport(Lib, EntryPoint = "cudaEventRecord")]
    internal static partial int EventRecord(nint e, nint stream);

    [LibraryImport(Lib, EntryPoint = "cudaEventSynchronize")]
    internal static partial int EventSynchronize(nint e);

    [LibraryImport(Lib, EntryPoint = "cudaEventDestroy")]
    internal static partial int EventDestroy(nint e);

    [LibraryImport(Lib, EntryPoint = "cudaHostRegister")]
    internal static partial int HostRegister(nint pointer, nuint bytes, uint flags);

    [LibraryImport(Lib, EntryPoint = "cudaHostUnregister")]
    internal static partial int HostUnregister(nint pointer);

    [LibraryImport(Lib, EntryPoint = "cudaMemGetInfo")]
    internal static partial int MemGetInfo(out nuint free, out nuint total);

    [LibraryImport(Lib, EntryPoint = "cudaGetErrorString")]
    private static partial nint GetErrorString(int error);

    internal static void Check(int error, string what)
    {
        if (error != 0)
            throw new DeviceMemoryException($"{what} failed: CUDA error {error} ({Marshal.PtrToStringUTF8(GetErrorString(error))})");
    }

    // Loads libcudart from the loader's path or the usual toolkit locations, so that the imports above (which name the
    // soname) bind to it. False when no CUDA 12 runtime is installed.
    internal static bool TryLoad()
    {
        string? home = Environment.GetEnvironmentVariable("CUDA_HOME") ?? Environment.GetEnvironmentVariable("CUDA_PATH");
        string[] candidates =
        [
            Lib,
            home is null ? "" : Path.Combine(home, "lib64", Lib),
            "/usr/local/cuda/lib64/" + Lib,
            "/usr/lib/x86_64-linux-gnu/" + Lib,
        ];
        foreach (string candidate in candidates)
        {
            if (candidate.Length > 0 && NativeLibrary.TryLoad(candidate, out _))
                return true;
        }
        return false;
    }
}
