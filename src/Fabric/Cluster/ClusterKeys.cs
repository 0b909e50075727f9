using System.Text;

namespace KvFabric.Cluster;

/// <summary>The store's key layout: /kvfabric/&lt;cluster&gt;/nodes/&lt;node&gt;.</summary>
public static class ClusterKeys
{
    /// <summary>"/kvfabric/&lt;cluster&gt;/nodes/", the prefix all of a cluster's node keys share.</summary>
    public static string NodesPrefix(string cluster)
    {
        ValidateName(cluster, "cluster name");
        return "/kvfabric/" + cluster + "/nodes/";
    }

    public static string NodeKey(string cluster, string node)
    {
        ValidateName(node, "node name");
        return NodesPrefix(cluster) + node;
    }

    /// <summary>Names are non-empty, without '/', without control characters, at most 253 characters.</summary>
    public static void ValidateName(string name, string what)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (name.Length == 0 || name.Length > 253)
            throw new ArgumentException($"{what} must have 1 to 253 characters; got {name.Length}", nameof(name));
        foreach (char c in name)
        {
            if (c == '/' || char.IsControl(c))
                throw new ArgumentException($"{what} '{name}' contains '/' or a control character; use letters, digits, '-', '_' or '.'", nameof(name));
        }
    }

    /// <summary>The end of the key range that holds exactly the keys starting with <paramref name="prefix"/> (etcd's prefix end).</summary>
    public static byte[] PrefixEnd(ReadOnlySpan<byte> prefix)
    {
        byte[] end = prefix.ToArray();
        for (int i = end.Length - 1; i >= 0; i--)
        {
            if (end[i] < 0xff)
            {
                end[i]++;
                return end[..(i + 1)];
            }
        }

        return [0]; // every byte 0xff (or empty): to the end of the key space, etcd's "\0"
    }

    public static byte[] Utf8(string s) => Encoding.UTF8.GetBytes(s);
}
