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

    /// <summary>The dtype's name in configuration files and the API: fp32, fp16, bf16, fp8_e4m3, fp8_e5m2.</summary>
    public static string WireName(this KvDType dtype) => dtype switch
    {
        KvDType.F32 => "fp32",
        KvDType.F16 => "fp16",
        KvDType.BF16 => "bf16",
        KvDType.Fp8E4M3 => "fp8_e4m3",
        KvDType.Fp8E5M2 => "fp8_e5m2",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, $"Unknown KvDType value {(byte)dtype}."),
    };

    public static KvDType ParseWireName(string name) => name.ToLowerInvariant() switch
    {
        "fp32" or "f32" or "float32" => KvDType.F32,
        "fp16" or "f16" or "float16" => KvDType.F16,
        "bf16" or "bfloat16" => KvDType.BF16,
        "fp8_e4m3" => KvDType.Fp8E4M3,
        "fp8_e5m2" => KvDType.Fp8E5M2,
        _ => throw new ArgumentException($"unknown dtype '{name}'; use one of fp32, fp16, bf16, fp8_e4m3, fp8_e5m2"),
    };

    internal static bool IsKnown(this KvDType dtype) => dtype is >= KvDType.F32 and <= KvDType.Fp8E5M2;
}
