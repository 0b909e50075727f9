using System.Buffers;

namespace KvFabric.Transfer.Tcp;

/// <summary>
/// A reusable <see cref="Memory{T}"/> view of native memory, re-pointed for each socket operation, so sending from or
/// receiving into registered memory allocates nothing. One per direction per connection (one operation at a time).
/// </summary>
internal sealed unsafe class NativeMemoryManager : MemoryManager<byte>
{
    private byte* _pointer;
    private int _length;

    public Memory<byte> Reset(nint pointer, int length)
    {
        _pointer = (byte*)pointer;
        _length = length;
        return Memory;
    }

    public override Span<byte> GetSpan() => new(_pointer, _length);
    public override MemoryHandle Pin(int elementIndex = 0) => new(_pointer + elementIndex);
    public override void Unpin() { }
    protected override void Dispose(bool disposing) { }
}
