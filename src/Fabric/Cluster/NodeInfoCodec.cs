using System.Buffers;
using System.Text.Json;

namespace KvFabric.Cluster;

/// <summary>
/// The stored value of a node: UTF-8 JSON, one object with camelCase members
/// {"node","worker","grpcEndpoint","agentMetadata" (base64),"load","incarnation"}; unknown members are ignored so newer
/// nodes can add fields.
/// </summary>
public static class NodeInfoCodec
{
    public static byte[] Encode(NodeInfo info)
    {
        Validate(info);
        var buffer = new ArrayBufferWriter<byte>(256);
        using (var w = new Utf8JsonWriter(buffer))
        {
            w.WriteStartObject();
            w.WriteString("node", info.Node);
            w.WriteString("worker", info.Worker);
            w.WriteString("grpcEndpoint", info.GrpcEndpoint);
            w.WriteBase64String("agentMetadata", info.AgentMetadata);
            w.WriteNumber("load", info.Load);
            w.WriteNumber("incarnation", info.Incarnation);
            w.WriteEndObject();
        }

        return buffer.WrittenSpan.ToArray();
    }

    /// <summary>Decodes a stored value; throws FormatException naming what is wrong.</summary>
    public static NodeInfo Decode(ReadOnlySpan<byte> json)
    {
        try
        {
            var reader = new Utf8JsonReader(json);
            using JsonDocument doc = JsonDocument.ParseValue(ref reader);
            JsonElement root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new FormatException($"a node value must be a JSON object; got {root.ValueKind}");
            string node = Required(root, "node").GetString()!;
            string worker = root.TryGetProperty("worker", out var w) ? w.GetString() ?? "" : "";
            string endpoint = root.TryGetProperty("grpcEndpoint", out var e) ? e.GetString() ?? "" : "";
            byte[] metadata = root.TryGetProperty("agentMetadata", out var m) && m.ValueKind == JsonValueKind.String ? m.GetBytesFromBase64() : [];
            double load = root.TryGetProperty("load", out var l) ? l.GetDouble() : 0;
            ulong incarnation = root.TryGetProperty("incarnation", out var i) ? i.GetUInt64() : 0;
            return new NodeInfo(node, worker, endpoint, metadata, load, incarnation);
        }
        catch (Exception ex) when (ex is JsonException or InvalidOperationException)
        {
            throw new FormatException($"not a KvFabric node value (JSON as in docs/cluster.md): {ex.Message}", ex);
        }
    }

    public static void Validate(NodeInfo info)
    {
        ArgumentNullException.ThrowIfNull(info);
        ClusterKeys.ValidateName(info.Node, "node name");
        ArgumentNullException.ThrowIfNull(info.Worker);
        ArgumentNullException.ThrowIfNull(info.GrpcEndpoint);
        ArgumentNullException.ThrowIfNull(info.AgentMetadata);
        if (!double.IsFinite(info.Load))
            throw new ArgumentException($"node {info.Node}: load must be a finite number; got {info.Load}", nameof(info));
    }

    private static JsonElement Required(JsonElement root, string name) =>
        root.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String
            ? v
            : throw new FormatException($"a node value needs a string member \"{name}\"");
}
