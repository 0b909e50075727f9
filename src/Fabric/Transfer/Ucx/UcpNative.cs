using System.Runtime.InteropServices;

namespace KvFabric.Transfer.Ucx;

// Struct layouts and constants of UCX 1.13 (Debian libucx-dev 1.13.1, x86-64/arm64 LP64), read from
// /usr/include/ucp/api/ucp.h and ucp_def.h; UcxLayoutTests asserts every size and offset used here.
// Only the fields KvFabric sets are named; the rest are padding kept at zero (UCX reads only fields in field_mask).

/// <summary>ucp_params_t (ucp.h:976-1078): 80 bytes.</summary>
[StructLayout(LayoutKind.Explicit, Size = 80)]
internal struct UcpParams
{
    [FieldOffset(0)] public ulong FieldMask;
    [FieldOffset(8)] public ulong Features;
    [FieldOffset(16)] public nuint RequestSize;
    [FieldOffset(48)] public int MtWorkersShared;
    [FieldOffset(56)] public nuint EstimatedNumEps;
    [FieldOffset(72)] public nint Name;
}

/// <summary>ucp_worker_params_t (ucp.h:1216-1313): 200 bytes; cpu_mask is a 128-byte ucs_cpu_set_t at 16.</summary>
[StructLayout(LayoutKind.Explicit, Size = 200)]
internal struct UcpWorkerParams
{
    [FieldOffset(0)] public ulong FieldMask;
    [FieldOffset(8)] public int ThreadMode;
    [FieldOffset(144)] public uint Events;
    [FieldOffset(152)] public nint UserData;
    [FieldOffset(160)] public int EventFd;
    [FieldOffset(168)] public ulong Flags;
    [FieldOffset(176)] public nint Name;
}

/// <summary>ucp_ep_params_t (ucp_def.h:683-764): 104 bytes; err_handler (ucp_def.h:366) is {cb, arg} at 24.</summary>
[StructLayout(LayoutKind.Explicit, Size = 104)]
internal struct UcpEpParams
{
    [FieldOffset(0)] public ulong FieldMask;
    [FieldOffset(8)] public nint Address;
    [FieldOffset(16)] public int ErrMode;
    [FieldOffset(24)] public nint ErrHandlerCb;
    [FieldOffset(32)] public nint ErrHandlerArg;
    [FieldOffset(40)] public nint UserData;
    [FieldOffset(48)] public uint Flags;
    [FieldOffset(80)] public nint Name;
}

/// <summary>ucp_mem_map_params_t (ucp.h:1525-1590): 40 bytes.</summary>
[StructLayout(LayoutKind.Explicit, Size = 40)]
internal struct UcpMemMapParams
{
    [FieldOffset(0)] public ulong FieldMask;
    [FieldOffset(8)] public nint Address;
    [FieldOffset(16)] public nuint Length;
    [FieldOffset(24)] public uint Flags;
    [FieldOffset(28)] public uint Prot;
    [FieldOffset(32)] public int MemoryType;
}

/// <summary>ucp_context_attr_t (ucp.h:1114-1146): 64 bytes; name is char[UCP_ENTITY_NAME_MAX = 32].</summary>
[StructLayout(LayoutKind.Explicit, Size = 64)]
internal struct UcpContextAttr
{
    [FieldOffset(0)] public ulong FieldMask;
    [FieldOffset(8)] public nuint RequestSize;
    [FieldOffset(16)] public int ThreadMode;
    [FieldOffset(24)] public ulong MemoryTypes;
}

/// <summary>ucp_mem_attr_t (ucp_def.h:185-207): 32 bytes.</summary>
[StructLayout(LayoutKind.Explicit, Size = 32)]
internal struct UcpMemAttr
{
    [FieldOffset(0)] public ulong FieldMask;
    [FieldOffset(8)] public nint Address;
    [FieldOffset(16)] public nuint Length;
    [FieldOffset(24)] public int MemoryType;
}

/// <summary>ucp_request_param_t (ucp.h:1650-1731): 72 bytes; cb is a union of function pointers at 16.</summary>
[StructLayout(LayoutKind.Explicit, Size = 72)]
internal struct UcpRequestParam
{
    [FieldOffset(0)] public uint OpAttrMask;
    [FieldOffset(4)] public uint Flags;
    [FieldOffset(8)] public nint Request;
    [FieldOffset(16)] public nint Callback;
    [FieldOffset(24)] public ulong Datatype;
    [FieldOffset(32)] public nint UserData;
    [FieldOffset(40)] public nint ReplyBuffer;
    [FieldOffset(48)] public int MemoryType;
    [FieldOffset(56)] public nint RecvInfo;
    [FieldOffset(64)] public nint Memh;
}

/// <summary>ucp_am_handler_param_t (ucp.h:1777-1806): 32 bytes.</summary>
[StructLayout(LayoutKind.Explicit, Size = 32)]
internal struct UcpAmHandlerParam
{
    [FieldOffset(0)] public ulong FieldMask;
    [FieldOffset(8)] public uint Id;
    [FieldOffset(12)] public uint Flags;
    [FieldOffset(16)] public nint Callback;
    [FieldOffset(24)] public nint Arg;
}

/// <summary>struct ucp_am_recv_param (ucp.h, "ucp_am_recv_param"): {uint64_t recv_attr; ucp_ep_h reply_ep;}, 16 bytes.</summary>
[StructLayout(LayoutKind.Explicit, Size = 16)]
internal struct UcpAmRecvParam
{
    [FieldOffset(0)] public ulong RecvAttr;
    [FieldOffset(8)] public nint ReplyEp;
}

/// <summary>The UCX 1.13 constants KvFabric uses (values from the headers; UcxLayoutTests pins them).</summary>
internal static class Ucp
{
    public const uint ApiMajor = 1, ApiMinor = 13;                       // ucp_version.h
    public const ulong ParamFieldFeatures = 1, ParamFieldName = 1 << 8;  // ucp_params_field
    public const ulong FeatureRma = 1 << 1, FeatureAm = 1 << 6;          // ucp_feature
    public const ulong WorkerParamFieldThreadMode = 1, WorkerParamFieldName = 1 << 6;
    public const int ThreadModeSingle = 0, ThreadModeSerialized = 1, ThreadModeMulti = 2; // ucs_thread_mode_t
    public const ulong EpParamFieldRemoteAddress = 1, EpParamFieldErrHandlingMode = 1 << 1, EpParamFieldErrHandler = 1 << 2,
        EpParamFieldUserData = 1 << 3, EpParamFieldName = 1 << 7;
    public const int ErrHandlingModePeer = 1;
    public const ulong MemMapFieldAddress = 1, MemMapFieldLength = 1 << 1, MemMapFieldFlags = 1 << 2, MemMapFieldProt = 1 << 3;
    public const uint MemMapAllocate = 1 << 1;                           // UCP_MEM_MAP_ALLOCATE
    public const ulong MemMapFieldMemoryType = 1 << 4;                   // UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE
    public const ulong AttrFieldMemoryTypes = 1 << 2;                    // UCP_ATTR_FIELD_MEMORY_TYPES
    public const int MemoryTypeCuda = 1;                                 // ucs_memory_type_t UCS_MEMORY_TYPE_CUDA
    public const ulong MemAttrFieldAddress = 1, MemAttrFieldLength = 1 << 1;
    public const uint ProtLocalRead = 1, ProtLocalWrite = 2, ProtRemoteRead = 1 << 8, ProtRemoteWrite = 1 << 9;
    public const uint OpAttrRequest = 1, OpAttrCallback = 1 << 1, OpAttrUserData = 1 << 2, OpAttrDatatype = 1 << 3, OpAttrFlags = 1 << 4;
    public const ulong AmHandlerFieldId = 1, AmHandlerFieldFlags = 1 << 1, AmHandlerFieldCb = 1 << 2, AmHandlerFieldArg = 1 << 3;
    public const uint AmSendFlagReply = 1, AmSendFlagEager = 1 << 1;
    public const ulong AmRecvAttrFieldReplyEp = 1, AmRecvAttrFlagData = 1 << 16, AmRecvAttrFlagRndv = 1 << 17;
    public const uint EpCloseFlagForce = 1;
    public const int StatusOk = 0, StatusInProgress = 1, StatusNoMessage = -2;
    public const int ErrLast = -100; // a request pointer in (ErrLast, -1] is an error status (UCS_PTR_IS_ERR)
}

/// <summary>[LibraryImport] bindings of libucp.so.0 and libucs.so.0 (1.13).</summary>
internal static unsafe partial class UcpNative
{
    private const string UcpLib = "libucp.so.0", UcsLib = "libucs.so.0";

    [LibraryImport(UcpLib, EntryPoint = "ucp_config_read", StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int ConfigRead(string? envPrefix, string? filename, out nint config);

    [LibraryImport(UcpLib, EntryPoint = "ucp_config_modify", StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int ConfigModify(nint config, string name, string value);

    [LibraryImport(UcpLib, EntryPoint = "ucp_config_release")]
    internal static partial void ConfigRelease(nint config);

    [LibraryImport(UcpLib, EntryPoint = "ucp_init_version")]
    internal static partial int InitVersion(uint apiMajor, uint apiMinor, UcpParams* parameters, nint config, out nint context);

    [LibraryImport(UcpLib, EntryPoint = "ucp_cleanup")]
    internal static partial void Cleanup(nint context);

    [LibraryImport(UcpLib, EntryPoint = "ucp_worker_create")]
    internal static partial int WorkerCreate(nint context, UcpWorkerParams* parameters, out nint worker);

    [LibraryImport(UcpLib, EntryPoint = "ucp_worker_destroy")]
    internal static partial void WorkerDestroy(nint worker);

    [LibraryImport(UcpLib, EntryPoint = "ucp_worker_get_address")]
    internal static partial int WorkerGetAddress(nint worker, out nint address, out nuint length);

    [LibraryImport(UcpLib, EntryPoint = "ucp_worker_release_address")]
    internal static partial void WorkerReleaseAddress(nint worker, nint address);

    [LibraryImport(UcpLib, EntryPoint = "ucp_worker_progress")]
    internal static partial uint WorkerProgress(nint worker);

    [LibraryImport(UcpLib, EntryPoint = "ucp_worker_set_am_recv_handler")]
    internal static partial int WorkerSetAmRecvHandler(nint worker, UcpAmHandlerParam* parameters);

    [LibraryImport(UcpLib, EntryPoint = "ucp_ep_create")]
    internal static partial int EpCreate(nint worker, UcpEpParams* parameters, out nint ep);

    [LibraryImport(UcpLib, EntryPoint = "ucp_ep_close_nbx")]
    internal static partial nint EpCloseNbx(nint ep, UcpRequestParam* parameters);

    [LibraryImport(UcpLib, EntryPoint = "ucp_ep_flush_nbx")]
    internal static partial nint EpFlushNbx(nint ep, UcpRequestParam* parameters);

    [LibraryImport(UcpLib, EntryPoint = "ucp_ep_print_info")]
    internal static partial void EpPrintInfo(nint ep, nint stream);

    [LibraryImport(UcpLib, EntryPoint = "ucp_mem_map")]
    internal static partial int MemMap(nint context, UcpMemMapParams* parameters, out nint memh);

    [LibraryImport(UcpLib, EntryPoint = "ucp_context_query")]
    internal static partial int ContextQuery(nint context, UcpContextAttr* attributes);

    [LibraryImport(UcpLib, EntryPoint = "ucp_mem_query")]
    internal static partial int MemQuery(nint memh, UcpMemAttr* attributes);

    [LibraryImport(UcpLib, EntryPoint = "ucp_mem_unmap")]
    internal static partial int MemUnmap(nint context, nint memh);

    [LibraryImport(UcpLib, EntryPoint = "ucp_rkey_pack")]
    internal static partial int RkeyPack(nint context, nint memh, out nint buffer, out nuint size);

    [LibraryImport(UcpLib, EntryPoint = "ucp_rkey_buffer_release")]
    internal static partial void RkeyBufferRelease(nint buffer);

    [LibraryImport(UcpLib, EntryPoint = "ucp_ep_rkey_unpack")]
    internal static partial int EpRkeyUnpack(nint ep, byte* buffer, out nint rkey);

    [LibraryImport(UcpLib, EntryPoint = "ucp_rkey_destroy")]
    internal static partial void RkeyDestroy(nint rkey);

    [LibraryImport(UcpLib, EntryPoint = "ucp_put_nbx")]
    internal static partial nint PutNbx(nint ep, nint buffer, nuint count, ulong remoteAddress, nint rkey, UcpRequestParam* parameters);

    [LibraryImport(UcpLib, EntryPoint = "ucp_get_nbx")]
    internal static partial nint GetNbx(nint ep, nint buffer, nuint count, ulong remoteAddress, nint rkey, UcpRequestParam* parameters);

    [LibraryImport(UcpLib, EntryPoint = "ucp_am_send_nbx")]
    internal static partial nint AmSendNbx(nint ep, uint id, void* header, nuint headerLength, void* buffer, nuint count, UcpRequestParam* parameters);

    [LibraryImport(UcpLib, EntryPoint = "ucp_request_check_status")]
    internal static partial int RequestCheckStatus(nint request);

    [LibraryImport(UcpLib, EntryPoint = "ucp_request_free")]
    internal static partial void RequestFree(nint request);

    [LibraryImport(UcsLib, EntryPoint = "ucs_status_string")]
    internal static partial nint StatusString(int status);

    // open_memstream gives ucp_ep_print_info a FILE* whose text we read back (1.13's ucp_ep_query has no transports field).
    [LibraryImport("libc", EntryPoint = "open_memstream")]
    internal static partial nint OpenMemstream(out nint buffer, out nuint size);

    [LibraryImport("libc", EntryPoint = "fclose")]
    internal static partial int Fclose(nint stream);

    [LibraryImport("libc", EntryPoint = "free")]
    internal static partial void Free(nint pointer);

    internal static string Describe(int status)
    {
        try
        {
            return $"{Marshal.PtrToStringUTF8(StatusString(status))} ({status})";
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return $"UCS status {status}";
        }
    }

    /// <summary>UCS_PTR_IS_ERR / UCS_PTR_STATUS for a returned request pointer.</summary>
    internal static bool IsError(nint p, out int status)
    {
        long v = p;
        if (v < 0 && v > Ucp.ErrLast - 1)
        {
            status = (int)v;
            return true;
        }
        status = 0;
        return false;
    }
}
