using System.Buffers;

namespace KvFabric.Memory;

/// <summary>A Memory&lt;byte&gt; view of native memory the owner keeps alive (a pool slot); created once per slot, not per use.</summary>
internal sealed unsafe class NativeMemoryManager(nint address, int length) : MemoryManager<byte>
{
    public override Span<byte> GetSpan() => new((void*)address, length);

    public override MemoryHandle Pin(int elementIndex = 0) => new((byte*)address + elementIndex);

    public override void Unpin()
    {
    }

    protected override void Dispose(bool disposing)
    {
    }
}
