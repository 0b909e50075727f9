using KvFabric.Workers.Model;

namespace KvFabric.Tests.Workers;

// A plain, slow, double-precision implementation of the same architecture, written straight from the definition,
// to check that the fast float32 kernels compute the model they claim to (and where each K/V element lands).
internal sealed class ReferenceModel
{
    private readonly ModelConfig _c;
    private readonly ModelWeights _w;

    public ReferenceModel(ModelConfig config)
    {
        _c = config;
        _w = new ModelWeights(config);
    }

    // K[layer][position][kvHead][dim] and V likewise, after RoPE for K.
    public double[][][][] K { get; private set; } = [];

    public double[][][][] V { get; private set; } = [];

    public double[] Run(int[] tokens)
    {
        ModelConfig c = _c;
        int n = tokens.Length, d = c.DModel, hd = c.HeadDim;
        K = new double[c.Layers][][][];
        V = new double[c.Layers][][][];
        var x = new double[n][];
        for (int t = 0; t < n; t++)
        {
            x[t] = new double[d];
            for (int i = 0; i < d; i++)
            {
                x[t][i] = _w.Embedding[(tokens[t] * d) + i];
            }
        }

        for (int l = 0; l < c.Layers; l++)
        {
            LayerWeights lw = _w.Layers[l];
            var q = new double[n][][];
            K[l] = new double[n][][];
            V[l] = new double[n][][];
            for (int t = 0; t < n; t++)
            {
                double[] xn = Norm(x[t], lw.AttnNorm);
                double[] qf = MatVec(lw.Wq, xn, c.QDim);
                double[] kf = MatVec(lw.Wk, xn, c.KvDim);
                double[] vf = MatVec(lw.Wv, xn, c.KvDim);
                q[t] = Split(qf, c.Heads, hd).Select(h => Rope(h, t)).ToArray();
                K[l][t] = Split(kf, c.KvHeads, hd).Select(h => Rope(h, t)).ToArray();
                V[l][t] = Split(vf, c.KvHeads, hd);
            }

            for (int t = 0; t < n; t++)
            {
                var att = new double[c.QDim];
                for (int h = 0; h < c.Heads; h++)
                {
                    int g = h / c.GroupSize;
                    var scores = new double[t + 1];
                    for (int j = 0; j <= t; j++)
                    {
                        scores[j] = Dot(q[t][h], K[l][j][g]) / Math.Sqrt(hd);
                    }

                    double max = scores.Max();
                    double sum = scores.Sum(s => Math.Exp(s - max));
                    for (int j = 0; j <= t; j++)
                    {
                        double p = Math.Exp(scores[j] - max) / sum;
                        for (int i = 0; i < hd; i++)
                        {
                            att[(h * hd) + i] += p * V[l][j][g][i];
                        }
                    }
                }

                Add(x[t], MatVec(lw.Wo, att, d));
                double[] xn = Norm(x[t], lw.MlpNorm);
                double[] gate = MatVec(lw.WGate, xn, c.Ffn);
                double[] up = MatVec(lw.WUp, xn, c.Ffn);
                var h2 = new double[c.Ffn];
                for (int i = 0; i < c.Ffn; i++)
                {
                    h2[i] = gate[i] / (1 + Math.Exp(-gate[i])) * up[i];
                }

                Add(x[t], MatVec(lw.WDown, h2, d));
            }
        }

        double[] last = Norm(x[n - 1], _w.FinalNorm);
        double[] logits = MatVec(_w.LmHead ?? _w.Embedding, last, c.Vocab);
        if (_w.LmHead is null)
        {
            for (int i = 0; i < logits.Length; i++)
            {
                logits[i] /= Math.Sqrt(d);
            }
        }

        return logits;
    }

    private double[] Rope(double[] v, int pos)
    {
        int half = v.Length / 2;
        var r = new double[v.Length];
        for (int i = 0; i < half; i++)
        {
            double angle = pos * Math.Pow(_c.RopeTheta, -2.0 * i / v.Length);
            r[i] = (v[i] * Math.Cos(angle)) - (v[i + half] * Math.Sin(angle));
            r[i + half] = (v[i] * Math.Sin(angle)) + (v[i + half] * Math.Cos(angle));
        }

        return r;
    }

    private double[] Norm(double[] v, float[] gain)
    {
        double ms = v.Sum(a => a * a) / v.Length;
        double inv = 1 / Math.Sqrt(ms + _c.NormEpsilon);
        return v.Select((a, i) => a * inv * gain[i]).ToArray();
    }

    private static double[] MatVec(float[] w, double[] x, int rows)
    {
        var y = new double[rows];
        for (int r = 0; r < rows; r++)
        {
            double s = 0;
            for (int i = 0; i < x.Length; i++)
            {
                s += w[(r * x.Length) + i] * x[i];
            }

            y[r] = s;
        }

        return y;
    }

    private static double[][] Split(double[] v, int heads, int hd) =>
        Enumerable.Range(0, heads).Select(h => v.AsSpan(h * hd, hd).ToArray()).ToArray();

    private static double Dot(double[] a, double[] b)
    {
        double s = 0;
        for (int i = 0; i < a.Length; i++)
        {
            s += a[i] * b[i];
        }

        return s;
    }

    private static void Add(double[] x, double[] y)
    {
        for (int i = 0; i < x.Length; i++)
        {
            x[i] += y[i];
        }
    }
}
