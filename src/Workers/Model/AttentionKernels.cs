using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace KvFabric.Workers.Model;

// Attention's inner loops. The score of (query, key) has one fixed recipe: 8-lane fused multiply-adds over the
// head dimension in order, then the 8 lanes summed as ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), then any dimensions
// past the last multiple of 8 added in order. Keys are scored 8 at a time so the lane sums of 8 keys share one
// transposing reduction; a key's score does not depend on which keys share its tile (missing ones are zero vectors).
// The weighted sum of values accumulates every output element over the keys in position order with fused
// multiply-adds. Nothing depends on the number of queries in flight.
internal static unsafe class AttentionKernels
{
    public const int KeyTile = 8;

    [SkipLocalsInit]
    public static void Scores(float* q, float** keys, int count, int hd, float* dst)
    {
        Vector256<float>* p = stackalloc Vector256<float>[KeyTile];
        int hd8 = hd & ~7;
        for (int j = 0; j < KeyTile; j++)
        {
            Vector256<float> acc = Vector256<float>.Zero;
            if (j < count)
            {
                float* k = keys[j];
                for (int d = 0; d < hd8; d += 8)
                {
                    acc = Vector256.FusedMultiplyAdd(Vector256.Load(q + d), Vector256.Load(k + d), acc);
                }
            }

            p[j] = acc;
        }

        Vector256<float> sums = Reduce8(p);
        if (count == KeyTile && hd8 == hd)
        {
            Vector256.Store(sums, dst);
            return;
        }

        for (int j = 0; j < count; j++)
        {
            float s = sums.GetElement(j);
            float* k = keys[j];
            for (int d = hd8; d < hd; d++)
            {
                s = MathF.FusedMultiplyAdd(q[d], k[d], s);
            }

            dst[j] = s;
        }
    }

    // Lane j of the result = ((p[j]0 + p[j]1) + (p[j]2 + p[j]3)) + ((p[j]4 + p[j]5) + (p[j]6 + p[j]7)).
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Reduce8(Vector256<float>* p)
    {
        if (Avx.IsSupported)
        {
            Vector256<float> u0 = Avx.HorizontalAdd(Avx.HorizontalAdd(p[0], p[1]), Avx.HorizontalAdd(p[2], p[3]));
            Vector256<float> u1 = Avx.HorizontalAdd(Avx.HorizontalAdd(p[4], p[5]), Avx.HorizontalAdd(p[6], p[7]));
            return Avx.Permute2x128(u0, u1, 0x20) + Avx.Permute2x128(u0, u1, 0x31);
        }

        return Reduce8Portable(p);
    }

    // The same tree without AVX (and what the AVX path is tested against).
    internal static Vector256<float> Reduce8Portable(Vector256<float>* p)
    {
        Span<float> r = stackalloc float[KeyTile];
        for (int j = 0; j < KeyTile; j++)
        {
            Vector256<float> v = p[j];
            r[j] = ((v.GetElement(0) + v.GetElement(1)) + (v.GetElement(2) + v.GetElement(3)))
                 + ((v.GetElement(4) + v.GetElement(5)) + (v.GetElement(6) + v.GetElement(7)));
        }

        return Vector256.Create((ReadOnlySpan<float>)r);
    }

    internal static Vector256<float> Reduce8ForTest(Vector256<float>* p) => Reduce8(p);

    public static float Max(float* x, int n)
    {
        // Max is exact, so any order gives the same result.
        var m = Vector256.Create(float.NegativeInfinity);
        int i = 0;
        for (; i <= n - 8; i += 8)
        {
            m = Vector256.Max(m, Vector256.Load(x + i));
        }

        float r = float.NegativeInfinity;
        for (int j = 0; j < 8; j++)
        {
            r = Math.Max(r, m.GetElement(j));
        }

        for (; i < n; i++)
        {
            r = Math.Max(r, x[i]);
        }

        return r;
    }

    // out[d] = sum over keys i in order of w[i] * V_i[d], as a chain of fused multiply-adds starting from 0.
    public static void WeightedSum(KvCache cache, int layer, int g, float* w, int n, float* output, int hd, int tpb)
    {
        int stride = cache.TokenStride;
        int hd8 = hd & ~7;
        int d = 0;
        for (; d + 32 <= hd8; d += 32)
        {
            Vector256<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (int b = 0, i = 0; i < n; b++)
            {
                float* vs = cache.Slab(b, layer, 1) + ((long)g * hd) + d;
                int count = Math.Min(tpb, n - i);
                for (int t = 0; t < count; t++, i++)
                {
                    float* v = vs + ((long)t * stride);
                    var e = Vector256.Create(w[i]);
                    a0 = Vector256.FusedMultiplyAdd(e, Vector256.Load(v), a0);
                    a1 = Vector256.FusedMultiplyAdd(e, Vector256.Load(v + 8), a1);
                    a2 = Vector256.FusedMultiplyAdd(e, Vector256.Load(v + 16), a2);
                    a3 = Vector256.FusedMultiplyAdd(e, Vector256.Load(v + 24), a3);
                }
            }

            Vector256.Store(a0, output + d);
            Vector256.Store(a1, output + d + 8);
            Vector256.Store(a2, output + d + 16);
            Vector256.Store(a3, output + d + 24);
        }

        for (; d < hd8; d += 8)
        {
            Vector256<float> a0 = default;
            for (int b = 0, i = 0; i < n; b++)
            {
                float* vs = cache.Slab(b, layer, 1) + ((long)g * hd) + d;
                int count = Math.Min(tpb, n - i);
                for (int t = 0; t < count; t++, i++)
                {
                    a0 = Vector256.FusedMultiplyAdd(Vector256.Create(w[i]), Vector256.Load(vs + ((long)t * stride)), a0);
                }
            }

            Vector256.Store(a0, output + d);
        }

        for (; d < hd; d++)
        {
            float a = 0f;
            for (int b = 0, i = 0; i < n; b++)
            {
                float* vs = cache.Slab(b, layer, 1) + ((long)g * hd) + d;
                int count = Math.Min(tpb, n - i);
                for (int t = 0; t < count; t++, i++)
                {
                    a = MathF.FusedMultiplyAdd(w[i], vs[(long)t * stride], a);
                }
            }

            output[d] = a;
        }
    }
}
