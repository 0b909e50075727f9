namespace KvFabric.Client.Grpc;

/// <summary>The gRPC status codes (numbers fixed by the gRPC specification).</summary>
public enum StatusCode
{
    OK = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// <summary>A call that ended with a status other than OK, on either side. The message says what was wrong and what to do.</summary>
public sealed class RpcException : Exception
{
    public RpcException(StatusCode status, string detail, Exception? inner = null)
        : base($"{status}: {detail}", inner)
    {
        Status = status;
        Detail = detail;
    }

    public StatusCode Status { get; }
    public string Detail { get; }
}
