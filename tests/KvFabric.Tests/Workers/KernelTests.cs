using System.Runtime.Intrinsics;
using KvFabric.Workers.Model;
using Xunit;

namespace KvFabric.Tests.Workers;

public sealed unsafe class KernelTests
{
    private static float[] Random(int n, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => (float)((rng.NextDouble() * 2) - 1)).ToArray();
    }

    [Theory]
    [InlineData(1, 1, 1)]
    [InlineData(5, 7, 3)]
    [InlineData(9, 70, 37)]
    [InlineData(13, 130, 64)]
    [InlineData(33, 9, 256)]
    public void Every_matmul_tiling_and_split_gives_the_plain_dot_of_each_row(int rows, int n, int k)
    {
        float[] x = Random(rows * k, 1), w = Random(n * k, 2);
        var expected = new float[rows * n];
        fixed (float* px = x, pw = w)
        {
            for (int r = 0; r < rows; r++)
            {
                for (int j = 0; j < n; j++)
                {
                    expected[(r * n) + j] = Kernels.Dot(px + (r * k), pw + (j * k), k);
                }
            }

            foreach (int workers in new[] { 1, 2, 3 })
            {
                var y = new float[rows * n];
                fixed (float* py = y)
                {
                    Kernels.MatMul(px, rows, k, pw, n, py, workers);
                    // Force the parallel paths even for small sizes by computing ranges directly.
                    Kernels.MatMulRange(px, k, pw, n, py, 0, rows / 2, 0, n);
                    Kernels.MatMulRange(px, k, pw, n, py, rows / 2, rows, 0, n / 2);
                    Kernels.MatMulRange(px, k, pw, n, py, rows / 2, rows, n / 2, n);
                }

                ModelTestKit.BitEqual(expected, y);
            }
        }
    }

    [Fact]
    public void Vector_and_scalar_exp_agree_bit_for_bit_and_are_accurate()
    {
        float[] xs = Random(4099, 3).Select(v => v * 90f).Concat([0f, -0f, 1f, -1f, 88f, -87f, 100f, -200f]).ToArray();
        var vec = (float[])xs.Clone();
        fixed (float* p = vec)
        {
            Kernels.ExpShifted(p, 0f, vec.Length);
        }

        for (int i = 0; i < xs.Length; i++)
        {
            float scalar = Kernels.Exp(xs[i]);
            Assert.Equal(BitConverter.SingleToInt32Bits(scalar), BitConverter.SingleToInt32Bits(vec[i]));
            if (xs[i] is > -80f and < 80f)
            {
                double exact = Math.Exp(xs[i]);
                Assert.True(Math.Abs(scalar - exact) <= 4e-7 * exact, $"exp({xs[i]}) = {scalar}, expected {exact}");
            }
        }
    }

    [Fact]
    public void Attention_lane_reduction_is_the_same_tree_with_and_without_avx()
    {
        float[] data = Random(64 * 50, 5).Select((v, i) => v * (1 << (i % 20))).ToArray();
        var p = stackalloc Vector256<float>[8];
        for (int t = 0; t < 50; t++)
        {
            for (int j = 0; j < 8; j++)
            {
                p[j] = Vector256.Create(data.AsSpan((t * 64) + (j * 8), 8));
            }

            var fast = AttentionKernels.Reduce8ForTest(p);
            var portable = AttentionKernels.Reduce8Portable(p);
            for (int j = 0; j < 8; j++)
            {
                Assert.Equal(BitConverter.SingleToInt32Bits(portable.GetElement(j)), BitConverter.SingleToInt32Bits(fast.GetElement(j)));
            }
        }
    }

    [Fact]
    public void Temperature_sampling_is_reproducible_from_its_seed()
    {
        float[] logits = Random(300, 4);
        int[] Draw(ulong seed)
        {
            Sampler s = Sampler.WithTemperature(1.5f, seed);
            return Enumerable.Range(0, 50).Select(_ => s.Sample(logits)).ToArray();
        }

        Assert.Equal(Draw(1), Draw(1));
        Assert.NotEqual(Draw(1), Draw(2));
        Assert.Equal(Sampler.ArgMax(logits), Sampler.Greedy().Sample(logits));
        Assert.True(Draw(1).Distinct().Count() > 5);
    }
}
