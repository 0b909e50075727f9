using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace KvFabric.Workers.Model;

// Float32 kernels whose results never depend on how many rows are processed together.
//
// Every dot product follows one recipe: one 8-lane accumulator fed by fused multiply-adds over the first
// floor(n/8)*8 elements in order, a fixed-order horizontal sum of the 8 lanes, then the remaining elements added one
// by one with scalar fused multiply-adds. The tiled matmul kernels compute several such dot products at once (to reuse
// loads), but each accumulator goes through exactly the same sequence of operations as Dot would, so a row's result is
// the same bit for bit whether it was computed alone, in a tile of four, or at any place of a batch. Vector256 is used
// explicitly (not Vector<T>) so the lane layout is 8 on every machine; Vector256.FusedMultiplyAdd is always fused.
// Element-wise kernels use the same operations in their vector body and their scalar tail.
internal static unsafe class Kernels
{
    private const int RowBlock = 64;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float HSum(Vector256<float> v)
    {
        Vector128<float> s = v.GetLower() + v.GetUpper();
        return (s.GetElement(0) + s.GetElement(2)) + (s.GetElement(1) + s.GetElement(3));
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Tail(float s, float* a, float* b, int k, int n)
    {
        for (; k < n; k++)
        {
            s = MathF.FusedMultiplyAdd(a[k], b[k], s);
        }

        return s;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Dot(float* a, float* b, int n)
    {
        Vector256<float> acc = Vector256<float>.Zero;
        int k = 0;
        for (; k <= n - 8; k += 8)
        {
            acc = Vector256.FusedMultiplyAdd(Vector256.Load(a + k), Vector256.Load(b + k), acc);
        }

        return Tail(HSum(acc), a, b, k, n);
    }

    /// <summary>Sum with the dot recipe's order (8 lanes, fixed horizontal sum, in-order tail).</summary>
    public static float Sum(float* a, int n)
    {
        Vector256<float> acc = Vector256<float>.Zero;
        int k = 0;
        for (; k <= n - 8; k += 8)
        {
            acc += Vector256.Load(a + k);
        }

        float s = HSum(acc);
        for (; k < n; k++)
        {
            s += a[k];
        }

        return s;
    }

    // y[t, j] = dot(x[t, :], w[j, :]) for t in [t0, t1), j in [j0, j1). x is rows x k, w is n x k, y is rows x n.
    public static void MatMulRange(float* x, int k, float* w, int n, float* y, int t0, int t1, int j0, int j1)
    {
        for (int jb = j0; jb < j1; jb += RowBlock)
        {
            int je = Math.Min(jb + RowBlock, j1);
            int t = t0;
            for (; t + 4 <= t1; t += 4)
            {
                int j = jb;
                for (; j + 2 <= je; j += 2)
                {
                    Kernel4x2(x + ((long)t * k), k, w + ((long)j * k), y + ((long)t * n) + j, n);
                }

                for (; j < je; j++)
                {
                    for (int i = 0; i < 4; i++)
                    {
                        y[((long)(t + i) * n) + j] = Dot(x + ((long)(t + i) * k), w + ((long)j * k), k);
                    }
                }
            }

            for (; t < t1; t++)
            {
                float* xt = x + ((long)t * k);
                float* yt = y + ((long)t * n);
                int j = jb;
                for (; j + 4 <= je; j += 4)
                {
                    Kernel1x4(xt, k, w + ((long)j * k), yt + j);
                }

                for (; j < je; j++)
                {
                    yt[j] = Dot(xt, w + ((long)j * k), k);
                }
            }
        }
    }

    // Splits across workers by rows (tokens) when there are enough, else by output columns; never inside a dot.
    // A single row (one decode step) stays on the calling thread: no fork/join cost and no allocation.
    public static void MatMul(float* x, int rows, int k, float* w, int n, float* y, int workers)
    {
        if (workers <= 1 || rows < 2 || (long)rows * n * k < (1L << 18))
        {
            MatMulRange(x, k, w, n, y, 0, rows, 0, n);
            return;
        }

        MatMulParallel((nint)x, rows, k, (nint)w, n, (nint)y, workers);
    }

    // Kept apart from MatMul so that its closure is only allocated when work is really split.
    private static void MatMulParallel(nint xp, int rows, int k, nint wp, int n, nint yp, int workers)
    {
        if (rows >= 4 * workers)
        {
            int tiles = (rows + 3) / 4;
            Parallel.For(0, workers, i =>
            {
                int t0 = Math.Min(rows, tiles * i / workers * 4);
                int t1 = Math.Min(rows, tiles * (i + 1) / workers * 4);
                MatMulRange((float*)xp, k, (float*)wp, n, (float*)yp, t0, t1, 0, n);
            });
        }
        else
        {
            Parallel.For(0, workers, i =>
            {
                int j0 = (int)((long)n * i / workers);
                int j1 = (int)((long)n * (i + 1) / workers);
                MatMulRange((float*)xp, k, (float*)wp, n, (float*)yp, 0, rows, j0, j1);
            });
        }
    }

    private static void Kernel4x2(float* x, int k, float* w, float* y, int n)
    {
        Vector256<float> a00 = default, a01 = default, a10 = default, a11 = default;
        Vector256<float> a20 = default, a21 = default, a30 = default, a31 = default;
        float* x0 = x, x1 = x + k, x2 = x + (2L * k), x3 = x + (3L * k);
        float* w0 = w, w1 = w + k;
        int p = 0;
        for (; p <= k - 8; p += 8)
        {
            Vector256<float> b0 = Vector256.Load(w0 + p);
            Vector256<float> b1 = Vector256.Load(w1 + p);
            Vector256<float> v = Vector256.Load(x0 + p);
            a00 = Vector256.FusedMultiplyAdd(v, b0, a00);
            a01 = Vector256.FusedMultiplyAdd(v, b1, a01);
            v = Vector256.Load(x1 + p);
            a10 = Vector256.FusedMultiplyAdd(v, b0, a10);
            a11 = Vector256.FusedMultiplyAdd(v, b1, a11);
            v = Vector256.Load(x2 + p);
            a20 = Vector256.FusedMultiplyAdd(v, b0, a20);
            a21 = Vector256.FusedMultiplyAdd(v, b1, a21);
            v = Vector256.Load(x3 + p);
            a30 = Vector256.FusedMultiplyAdd(v, b0, a30);
            a31 = Vector256.FusedMultiplyAdd(v, b1, a31);
        }

        y[0] = Tail(HSum(a00), x0, w0, p, k);
        y[1] = Tail(HSum(a01), x0, w1, p, k);
        y[n] = Tail(HSum(a10), x1, w0, p, k);
        y[n + 1] = Tail(HSum(a11), x1, w1, p, k);
        y[2L * n] = Tail(HSum(a20), x2, w0, p, k);
        y[(2L * n) + 1] = Tail(HSum(a21), x2, w1, p, k);
        y[3L * n] = Tail(HSum(a30), x3, w0, p, k);
        y[(3L * n) + 1] = Tail(HSum(a31), x3, w1, p, k);
    }

    private static void Kernel1x4(float* x, int k, float* w, float* y)
    {
        Vector256<float> a0 = default, a1 = default, a2 = default, a3 = default;
        float* w0 = w, w1 = w + k, w2 = w + (2L * k), w3 = w + (3L * k);
        int p = 0;
        for (; p <= k - 8; p += 8)
        {
            Vector256<float> v = Vector256.Load(x + p);
            a0 = Vector256.FusedMultiplyAdd(v, Vector256.Load(w0 + p), a0);
            a1 = Vector256.FusedMultiplyAdd(v, Vector256.Load(w1 + p), a1);
            a2 = Vector256.FusedMultiplyAdd(v, Vector256.Load(w2 + p), a2);
            a3 = Vector256.FusedMultiplyAdd(v, Vector256.Load(w3 + p), a3);
        }

        y[0] = Tail(HSum(a0), x, w0, p, k);
        y[1] = Tail(HSum(a1), x, w1, p, k);
        y[2] = Tail(HSum(a2), x, w2, p, k);
        y[3] = Tail(HSum(a3), x, w3, p, k);
    }

    // y = x / sqrt(mean(x^2) + eps) * g, one row of n.
    public static void RmsNorm(float* x, float* g, float* y, int n, float eps)
    {
        float ms = Dot(x, x, n) / n;
        float inv = 1f / MathF.Sqrt(ms + eps);
        var vinv = Vector256.Create(inv);
        int i = 0;
        for (; i <= n - 8; i += 8)
        {
            Vector256.Store(Vector256.Load(x + i) * vinv * Vector256.Load(g + i), y + i);
        }

        for (; i < n; i++)
        {
            y[i] = x[i] * inv * g[i];
        }
    }

    public static void AddInPlace(float* x, float* y, int n)
    {
        int i = 0;
        for (; i <= n - 8; i += 8)
        {
            Vector256.Store(Vector256.Load(x + i) + Vector256.Load(y + i), x + i);
        }

        for (; i < n; i++)
        {
            x[i] += y[i];
        }
    }

    public static void Scale(float* x, float s, int n)
    {
        var vs = Vector256.Create(s);
        int i = 0;
        for (; i <= n - 8; i += 8)
        {
            Vector256.Store(Vector256.Load(x + i) * vs, x + i);
        }

        for (; i < n; i++)
        {
            x[i] *= s;
        }
    }

    // gate[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
    public static void SwiGlu(float* gate, float* up, int n)
    {
        var one = Vector256.Create(1f);
        int i = 0;
        for (; i <= n - 8; i += 8)
        {
            Vector256<float> g = Vector256.Load(gate + i);
            Vector256.Store(g / (one + Exp(-g)) * Vector256.Load(up + i), gate + i);
        }

        for (; i < n; i++)
        {
            float g = gate[i];
            gate[i] = g / (1f + Exp(-g)) * up[i];
        }
    }

    // x[i] = exp(x[i] - m).
    public static void ExpShifted(float* x, float m, int n)
    {
        var vm = Vector256.Create(m);
        int i = 0;
        for (; i <= n - 8; i += 8)
        {
            Vector256.Store(Exp(Vector256.Load(x + i) - vm), x + i);
        }

        for (; i < n; i++)
        {
            x[i] = Exp(x[i] - m);
        }
    }

    // exp with our own polynomial so that the scalar and the vector versions agree bit for bit (and do not depend on
    // the platform's libm): exp(x) = 2^k * p(r), k = round(x / ln 2), r = x - k ln 2, p = degree-7 Taylor in Horner form.
    private const float Log2E = 1.44269504f;
    private const float Ln2Hi = 0.693145752f;
    private const float Ln2Lo = 1.42860677e-6f;
    private const float ExpMin = -87.3f;
    private const float ExpMax = 88.3f;
    private const float C7 = 1f / 5040f, C6 = 1f / 720f, C5 = 1f / 120f, C4 = 1f / 24f, C3 = 1f / 6f, C2 = 0.5f;

    public static float Exp(float x)
    {
        x = Math.Min(Math.Max(x, ExpMin), ExpMax);
        float k = MathF.Round(x * Log2E);
        float r = MathF.FusedMultiplyAdd(k, -Ln2Hi, x);
        r = MathF.FusedMultiplyAdd(k, -Ln2Lo, r);
        float p = MathF.FusedMultiplyAdd(C7, r, C6);
        p = MathF.FusedMultiplyAdd(p, r, C5);
        p = MathF.FusedMultiplyAdd(p, r, C4);
        p = MathF.FusedMultiplyAdd(p, r, C3);
        p = MathF.FusedMultiplyAdd(p, r, C2);
        p = MathF.FusedMultiplyAdd(p, r, 1f);
        p = MathF.FusedMultiplyAdd(p, r, 1f);
        return p * BitConverter.Int32BitsToSingle(((int)k + 127) << 23);
    }

    public static Vector256<float> Exp(Vector256<float> x)
    {
        x = Vector256.Min(Vector256.Max(x, Vector256.Create(ExpMin)), Vector256.Create(ExpMax));
        Vector256<float> k = Vector256.Round(x * Vector256.Create(Log2E));
        Vector256<float> r = Vector256.FusedMultiplyAdd(k, Vector256.Create(-Ln2Hi), x);
        r = Vector256.FusedMultiplyAdd(k, Vector256.Create(-Ln2Lo), r);
        Vector256<float> p = Vector256.FusedMultiplyAdd(Vector256.Create(C7), r, Vector256.Create(C6));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(C5));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(C4));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(C3));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(C2));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(1f));
        p = Vector256.FusedMultiplyAdd(p, r, Vector256.Create(1f));
        Vector256<int> bits = (Vector256.ConvertToInt32(k) + Vector256.Create(127)) << 23;
        return p * bits.AsSingle();
    }
}
