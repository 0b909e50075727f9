using System.Globalization;
using System.Net;
using System.Text;

namespace KvFabric.Client.Grpc;

/// <summary>Constants and small codecs of the gRPC-over-HTTP/2 protocol, shared by the client and the server.</summary>
public static class GrpcProtocol
{
    public const string ContentType = "application/grpc";
    public const string StatusHeader = "grpc-status";
    public const string MessageHeader = "grpc-message";
    public const string TimeoutHeader = "grpc-timeout";
    public const string EncodingHeader = "grpc-encoding";
    public const string AcceptEncodingHeader = "grpc-accept-encoding";
    public const string TenantHeader = "x-kvfabric-tenant";
    public const string SupportedEncodings = "identity,gzip";
    public const int MessagePrefixBytes = 5;
    public const int DefaultMaxMessageBytes = 4 << 20;

    /// <summary>True for "application/grpc", "application/grpc+proto" and the like (parameters allowed).</summary>
    public static bool IsGrpcContentType(string? contentType)
    {
        if (contentType is null || !contentType.StartsWith(ContentType, StringComparison.OrdinalIgnoreCase))
            return false;
        if (contentType.Length == ContentType.Length)
            return true;
        char next = contentType[ContentType.Length];
        return next is '+' or ';';
    }

    /// <summary>Encodes a deadline as grpc-timeout: at most 8 digits and a unit (the largest unit that keeps precision).</summary>
    public static string FormatTimeout(TimeSpan timeout)
    {
        long ticks = Math.Max(0, timeout.Ticks);
        long micros = Math.Max(1, ticks / 10);
        if (micros < 100_000_000)
            return micros.ToString(CultureInfo.InvariantCulture) + "u";
        long millis = micros / 1000;
        if (millis < 100_000_000)
            return millis.ToString(CultureInfo.InvariantCulture) + "m";
        long seconds = millis / 1000;
        if (seconds < 100_000_000)
            return seconds.ToString(CultureInfo.InvariantCulture) + "S";
        return Math.Min(seconds / 3600, 99_999_999).ToString(CultureInfo.InvariantCulture) + "H";
    }

    /// <summary>Parses grpc-timeout ("100m", "5S", "250000u", ...). False when it is malformed.</summary>
    public static bool TryParseTimeout(string? value, out TimeSpan timeout)
    {
        timeout = default;
        if (string.IsNullOrEmpty(value) || value.Length < 2 || value.Length > 9)
            return false;
        if (!long.TryParse(value.AsSpan(0, value.Length - 1), NumberStyles.None, CultureInfo.InvariantCulture, out long n))
            return false;
        double ms = value[^1] switch
        {
            'H' => n * 3_600_000.0,
            'M' => n * 60_000.0,
            'S' => n * 1000.0,
            'm' => n,
            'u' => n / 1000.0,
            'n' => n / 1_000_000.0,
            _ => double.NaN,
        };
        if (double.IsNaN(ms))
            return false;
        timeout = ms >= TimeSpan.MaxValue.TotalMilliseconds / 2 ? TimeSpan.MaxValue / 2 : TimeSpan.FromMilliseconds(ms);
        return true;
    }

    /// <summary>Percent-encodes grpc-message as the spec asks (UTF-8; bytes outside 0x20-0x7E and '%' escaped).</summary>
    public static string EncodeMessage(string message)
    {
        byte[] utf8 = Encoding.UTF8.GetBytes(message);
        var sb = new StringBuilder(utf8.Length);
        foreach (byte b in utf8)
        {
            if (b is >= 0x20 and <= 0x7E && b != (byte)'%')
                sb.Append((char)b);
            else
                sb.Append('%').Append(b.ToString("X2", CultureInfo.InvariantCulture));
        }

        return sb.ToString();
    }

    public static string DecodeMessage(string? encoded)
    {
        if (string.IsNullOrEmpty(encoded) || !encoded.Contains('%', StringComparison.Ordinal))
            return encoded ?? string.Empty;
        var bytes = new List<byte>(encoded.Length);
        for (int i = 0; i < encoded.Length; i++)
        {
            if (encoded[i] == '%' && i + 2 < encoded.Length
                && byte.TryParse(encoded.AsSpan(i + 1, 2), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out byte b))
            {
                bytes.Add(b);
                i += 2;
            }
            else
            {
                bytes.Add((byte)encoded[i]);
            }
        }

        return Encoding.UTF8.GetString(bytes.ToArray());
    }

    /// <summary>The status a client reports for an HTTP response that carries no grpc-status (gRPC's HTTP mapping).</summary>
    public static StatusCode FromHttpStatus(HttpStatusCode status) => status switch
    {
        HttpStatusCode.BadRequest => StatusCode.Internal,
        HttpStatusCode.Unauthorized => StatusCode.Unauthenticated,
        HttpStatusCode.Forbidden => StatusCode.PermissionDenied,
        HttpStatusCode.NotFound => StatusCode.Unimplemented,
        HttpStatusCode.TooManyRequests or HttpStatusCode.BadGateway or HttpStatusCode.ServiceUnavailable
            or HttpStatusCode.GatewayTimeout => StatusCode.Unavailable,
        _ => StatusCode.Unknown,
    };
}
