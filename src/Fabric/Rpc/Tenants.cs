using System.Security.Cryptography;
using System.Text;
using KvFabric.Client.Grpc;

namespace KvFabric.Rpc;

/// <summary>A tenant: a namespace of blocks and the bearer token that grants access to it.</summary>
public sealed record Tenant(uint Id, string Name, bool Admin = false);

public sealed record TenantConfig(string Name, string Token, bool Admin = false);

/// <summary>Checks a call's bearer token and tenant. Tokens are compared in constant time.</summary>
public sealed class TenantRegistry
{
    private readonly (Tenant Tenant, byte[] TokenHash)[] _tenants;
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, Tenant> _known = new(StringComparer.Ordinal);

    public TenantRegistry(IEnumerable<TenantConfig> tenants)
    {
        ArgumentNullException.ThrowIfNull(tenants);
        var list = new List<(Tenant, byte[])>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        var ids = new Dictionary<uint, string>();
        var tokens = new HashSet<string>(StringComparer.Ordinal);
        foreach (TenantConfig t in tenants)
        {
            if (string.IsNullOrWhiteSpace(t.Name) || t.Name.Length > 128)
                throw new ArgumentException($"tenant name must be 1..128 characters; got '{t.Name}'");
            if (string.IsNullOrEmpty(t.Token))
                throw new ArgumentException($"tenant '{t.Name}' has no token; give every tenant a token");
            if (!names.Add(t.Name))
                throw new ArgumentException($"tenant '{t.Name}' is configured twice");
            if (!tokens.Add(t.Token))
                throw new ArgumentException($"tenant '{t.Name}' has the same token as another tenant; give every tenant its own token");
            uint id = IdOf(t.Name);
            if (ids.TryGetValue(id, out string? other))
                throw new ArgumentException($"tenants '{other}' and '{t.Name}' hash to the same id {id}; rename one of them");
            ids[id] = t.Name;
            list.Add((new Tenant(id, t.Name, t.Admin), SHA256.HashData(Encoding.UTF8.GetBytes(t.Token))));
        }

        if (list.Count == 0)
            throw new ArgumentException("no tenants are configured: add at least one (name and token), or run with --dev");
        _tenants = list.ToArray();
    }

    public IEnumerable<Tenant> All => _tenants.Select(t => t.Tenant);

    /// <summary>
    /// A tenant's id: the first 4 bytes of SHA-256 of its name, never 0. Stable across restarts and config reorderings,
    /// because durable tiers (SSD) keep blocks under it: a tenant must find its own blocks again, and only its own.
    /// </summary>
    public static uint IdOf(string name)
    {
        uint id = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(SHA256.HashData(Encoding.UTF8.GetBytes("kvfabric-tenant:" + name)));
        return id == 0 ? 1 : id;
    }

    /// <summary>
    /// The tenant a call may act as. No or unknown token: UNAUTHENTICATED. No tenant header: INVALID_ARGUMENT.
    /// A valid token used for another (or an unknown) tenant: PERMISSION_DENIED.
    /// </summary>
    public Tenant Authenticate(string? authorization, string? tenantName)
    {
        // Valid tokens are remembered (bounded by the number of tenants); invalid ones are hashed every time.
        if (authorization is not null && tenantName is not null && _known.TryGetValue(authorization, out Tenant? known) && known.Name == tenantName)
            return known;
        const string Bearer = "Bearer ";
        if (string.IsNullOrEmpty(authorization) || !authorization.StartsWith(Bearer, StringComparison.OrdinalIgnoreCase))
            throw new RpcException(StatusCode.Unauthenticated, "missing bearer token: send metadata 'authorization: Bearer <token>'");
        byte[] hash = SHA256.HashData(Encoding.UTF8.GetBytes(authorization.AsSpan(Bearer.Length).Trim().ToString()));
        Tenant? owner = null;
        foreach (var (tenant, tokenHash) in _tenants)
        {
            if (CryptographicOperations.FixedTimeEquals(hash, tokenHash))
                owner ??= tenant;
        }

        if (owner is null)
            throw new RpcException(StatusCode.Unauthenticated, "the bearer token is not valid for any tenant of this node; check the token");
        if (string.IsNullOrEmpty(tenantName))
            throw new RpcException(StatusCode.InvalidArgument, $"missing tenant: send metadata '{GrpcProtocol.TenantHeader}: <tenant>'");
        if (!string.Equals(owner.Name, tenantName, StringComparison.Ordinal) && !_tenants.Any(t => t.Tenant.Name == tenantName))
            throw new RpcException(StatusCode.PermissionDenied, $"tenant '{tenantName}' is not configured on this node; check the tenant name");
        if (!string.Equals(owner.Name, tenantName, StringComparison.Ordinal))
            throw new RpcException(StatusCode.PermissionDenied, $"this token does not grant access to tenant '{tenantName}'");
        if (_known.Count < 4 * _tenants.Length)
            _known.TryAdd(authorization, owner);
        return owner;
    }
}
