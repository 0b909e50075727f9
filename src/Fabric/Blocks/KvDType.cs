namespace KvFabric.Blocks;

// The numeric values are written into the layout's canonical encoding (hashing spec v1): never renumber or reuse one.
public enum KvDType : byte
{
    F32 = 1,
    F16 = 2,
    BF16 = 3,
    Fp8E4M3 = 4,
    Fp8E5M2 = 5,
}

public static class KvDTypeExtensions
{
    public static int SizeInBytes(this KvDType dtype) => dtype switch
    {
        KvDType.F32 => 4,
        KvDType.F16 or KvDType.BF16 => 2,
        KvDType.Fp8E4M3 or KvDType.Fp8E5M2 => 1,
        _ => throw new ArgumentOutOfRangeException(
            nameof(dtype), dtype,
            $"Unknown KvDType value {(byte)dtype}; known values are F32=1, F16=2, BF16=3, Fp8E4M3=4, Fp8E5M2=5."),
    };

    internal static bool IsKnown(this KvDType dtype) => dtype is >= KvDType.F32 and <= KvDType.Fp8E5M2;
}
