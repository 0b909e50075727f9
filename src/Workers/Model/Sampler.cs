namespace KvFabric.Workers.Model;

/// <summary>
/// Picks the next token from logits: greedy argmax (lowest id on ties), or temperature sampling driven by a seeded
/// counter-based generator, so a given seed reproduces the same tokens on every run and machine.
/// </summary>
public sealed class Sampler
{
    private readonly ulong _stream;
    private float[] _probs = [];
    private ulong _draws;

    private Sampler(float temperature, ulong seed)
    {
        Temperature = temperature;
        _stream = WeightRng.Stream(seed, 0x5A4D504C45UL);
    }

    public static Sampler Greedy() => new(0f, 0);

    public static Sampler WithTemperature(float temperature, ulong seed)
    {
        if (!(temperature > 0f) || float.IsInfinity(temperature))
        {
            throw new ArgumentOutOfRangeException(nameof(temperature), temperature, "temperature must be a finite positive number");
        }

        return new Sampler(temperature, seed);
    }

    /// <summary>0 means greedy.</summary>
    public float Temperature { get; }

    /// <summary>Draws made so far (each temperature sample uses the next counter value).</summary>
    public ulong Draws => _draws;

    public static int ArgMax(ReadOnlySpan<float> logits)
    {
        if (logits.IsEmpty)
        {
            throw new ArgumentException("logits are empty", nameof(logits));
        }

        int best = 0;
        for (int i = 1; i < logits.Length; i++)
        {
            if (logits[i] > logits[best])
            {
                best = i;
            }
        }

        return best;
    }

    public unsafe int Sample(ReadOnlySpan<float> logits)
    {
        int best = ArgMax(logits);
        if (Temperature == 0f)
        {
            return best;
        }

        if (_probs.Length < logits.Length)
        {
            _probs = GC.AllocateUninitializedArray<float>(logits.Length, pinned: true);
        }

        float m = logits[best];
        float invT = 1f / Temperature;
        fixed (float* p = _probs)
        {
            for (int i = 0; i < logits.Length; i++)
            {
                p[i] = (logits[i] - m) * invT;
            }

            Kernels.ExpShifted(p, 0f, logits.Length);
            float total = Kernels.Sum(p, logits.Length);
            float u = WeightRng.Uniform(_stream, _draws++) * total;
            float acc = 0f;
            for (int i = 0; i < logits.Length; i++)
            {
                acc += p[i];
                if (u < acc)
                {
                    return i;
                }
            }
        }

        return best;
    }
}
