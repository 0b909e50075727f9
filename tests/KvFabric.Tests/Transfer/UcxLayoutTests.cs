using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using KvFabric.Transfer.Ucx;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// The UCX struct layouts and constants KvFabric relies on, pinned to the values of the UCX 1.13.1 headers
/// (/usr/include/ucp/api/ucp.h, ucp_def.h, ucp_version.h of Debian libucx-dev 1.13.1, LP64). A UCX upgrade that moves
/// a field fails here instead of corrupting memory.
/// </summary>
public sealed class UcxLayoutTests
{
    private static int Offset<T>(string field) where T : struct => (int)Marshal.OffsetOf<T>(field);

    [Fact]
    public void Ucx_struct_sizes_match_the_1_13_headers()
    {
        Assert.Equal(80, Unsafe.SizeOf<UcpParams>());           // ucp.h:976 typedef struct ucp_params ... } ucp_params_t (ucp.h:1078)
        Assert.Equal(200, Unsafe.SizeOf<UcpWorkerParams>());    // ucp.h:1216-1313, ucs_cpu_set_t is 1024 bits
        Assert.Equal(104, Unsafe.SizeOf<UcpEpParams>());        // ucp_def.h:683-764
        Assert.Equal(40, Unsafe.SizeOf<UcpMemMapParams>());     // ucp.h:1525-1590
        Assert.Equal(72, Unsafe.SizeOf<UcpRequestParam>());     // ucp.h:1650-1731 (with memh, new in 1.13)
        Assert.Equal(32, Unsafe.SizeOf<UcpAmHandlerParam>());   // ucp.h:1777-1806
        Assert.Equal(16, Unsafe.SizeOf<UcpAmRecvParam>());      // struct ucp_am_recv_param {recv_attr; reply_ep;}
        Assert.Equal(32, Unsafe.SizeOf<UcpMemAttr>());          // ucp_def.h:185-207
        Assert.Equal(64, Unsafe.SizeOf<UcpContextAttr>());      // ucp.h:1114-1146, name[UCP_ENTITY_NAME_MAX = 32] at 32
    }

    [Fact]
    public void Ucx_field_offsets_match_the_1_13_headers()
    {
        // ucp_params_t (ucp.h:976): field_mask, features, request_size, request_init, request_cleanup, tag_sender_mask,
        // mt_workers_shared (int, padded), estimated_num_eps, estimated_num_ppn, name.
        Assert.Equal(8, Offset<UcpParams>(nameof(UcpParams.Features)));
        Assert.Equal(16, Offset<UcpParams>(nameof(UcpParams.RequestSize)));
        Assert.Equal(48, Offset<UcpParams>(nameof(UcpParams.MtWorkersShared)));
        Assert.Equal(56, Offset<UcpParams>(nameof(UcpParams.EstimatedNumEps)));
        Assert.Equal(72, Offset<UcpParams>(nameof(UcpParams.Name)));
        // ucp_worker_params_t (ucp.h:1216): field_mask, thread_mode, cpu_mask[128 B], events, user_data, event_fd, flags, name, am_alignment, client_id.
        Assert.Equal(8, Offset<UcpWorkerParams>(nameof(UcpWorkerParams.ThreadMode)));
        Assert.Equal(144, Offset<UcpWorkerParams>(nameof(UcpWorkerParams.Events)));
        Assert.Equal(152, Offset<UcpWorkerParams>(nameof(UcpWorkerParams.UserData)));
        Assert.Equal(160, Offset<UcpWorkerParams>(nameof(UcpWorkerParams.EventFd)));
        Assert.Equal(168, Offset<UcpWorkerParams>(nameof(UcpWorkerParams.Flags)));
        Assert.Equal(176, Offset<UcpWorkerParams>(nameof(UcpWorkerParams.Name)));
        // ucp_ep_params_t (ucp_def.h:683): field_mask, address, err_mode, err_handler {cb, arg} (ucp_def.h:366), user_data, flags, sockaddr, conn_request, name.
        Assert.Equal(8, Offset<UcpEpParams>(nameof(UcpEpParams.Address)));
        Assert.Equal(16, Offset<UcpEpParams>(nameof(UcpEpParams.ErrMode)));
        Assert.Equal(24, Offset<UcpEpParams>(nameof(UcpEpParams.ErrHandlerCb)));
        Assert.Equal(32, Offset<UcpEpParams>(nameof(UcpEpParams.ErrHandlerArg)));
        Assert.Equal(40, Offset<UcpEpParams>(nameof(UcpEpParams.UserData)));
        Assert.Equal(48, Offset<UcpEpParams>(nameof(UcpEpParams.Flags)));
        Assert.Equal(80, Offset<UcpEpParams>(nameof(UcpEpParams.Name)));
        // ucp_mem_map_params_t (ucp.h:1525): field_mask, address, length, flags, prot, memory_type.
        Assert.Equal(8, Offset<UcpMemMapParams>(nameof(UcpMemMapParams.Address)));
        Assert.Equal(16, Offset<UcpMemMapParams>(nameof(UcpMemMapParams.Length)));
        Assert.Equal(24, Offset<UcpMemMapParams>(nameof(UcpMemMapParams.Flags)));
        Assert.Equal(28, Offset<UcpMemMapParams>(nameof(UcpMemMapParams.Prot)));
        Assert.Equal(32, Offset<UcpMemMapParams>(nameof(UcpMemMapParams.MemoryType)));
        // ucp_context_attr_t (ucp.h:1114): field_mask, request_size, thread_mode (enum, padded), memory_types, name.
        Assert.Equal(8, Offset<UcpContextAttr>(nameof(UcpContextAttr.RequestSize)));
        Assert.Equal(16, Offset<UcpContextAttr>(nameof(UcpContextAttr.ThreadMode)));
        Assert.Equal(24, Offset<UcpContextAttr>(nameof(UcpContextAttr.MemoryTypes)));
        // ucp_mem_attr_t (ucp_def.h:185): field_mask, address, length, mem_type.
        Assert.Equal(8, Offset<UcpMemAttr>(nameof(UcpMemAttr.Address)));
        Assert.Equal(16, Offset<UcpMemAttr>(nameof(UcpMemAttr.Length)));
        Assert.Equal(24, Offset<UcpMemAttr>(nameof(UcpMemAttr.MemoryType)));
        // ucp_request_param_t (ucp.h:1650): op_attr_mask, flags, request, cb, datatype, user_data, reply_buffer, memory_type, recv_info, memh.
        Assert.Equal(4, Offset<UcpRequestParam>(nameof(UcpRequestParam.Flags)));
        Assert.Equal(8, Offset<UcpRequestParam>(nameof(UcpRequestParam.Request)));
        Assert.Equal(16, Offset<UcpRequestParam>(nameof(UcpRequestParam.Callback)));
        Assert.Equal(24, Offset<UcpRequestParam>(nameof(UcpRequestParam.Datatype)));
        Assert.Equal(32, Offset<UcpRequestParam>(nameof(UcpRequestParam.UserData)));
        Assert.Equal(40, Offset<UcpRequestParam>(nameof(UcpRequestParam.ReplyBuffer)));
        Assert.Equal(48, Offset<UcpRequestParam>(nameof(UcpRequestParam.MemoryType)));
        Assert.Equal(56, Offset<UcpRequestParam>(nameof(UcpRequestParam.RecvInfo)));
        Assert.Equal(64, Offset<UcpRequestParam>(nameof(UcpRequestParam.Memh)));
        // ucp_am_handler_param_t (ucp.h:1777): field_mask, id (unsigned), flags (uint32_t), cb, arg.
        Assert.Equal(8, Offset<UcpAmHandlerParam>(nameof(UcpAmHandlerParam.Id)));
        Assert.Equal(12, Offset<UcpAmHandlerParam>(nameof(UcpAmHandlerParam.Flags)));
        Assert.Equal(16, Offset<UcpAmHandlerParam>(nameof(UcpAmHandlerParam.Callback)));
        Assert.Equal(24, Offset<UcpAmHandlerParam>(nameof(UcpAmHandlerParam.Arg)));
        Assert.Equal(8, Offset<UcpAmRecvParam>(nameof(UcpAmRecvParam.ReplyEp)));
    }

    [Fact]
    public void Ucx_constants_match_the_1_13_headers()
    {
        Assert.Equal((1u, 13u), (Ucp.ApiMajor, Ucp.ApiMinor));                 // ucp_version.h UCP_API_MAJOR/MINOR
        Assert.Equal((2ul, 64ul), (Ucp.FeatureRma, Ucp.FeatureAm));            // ucp.h enum ucp_feature: RMA = UCS_BIT(1), AM = UCS_BIT(6)
        Assert.Equal(256ul, Ucp.ParamFieldName);                               // UCP_PARAM_FIELD_NAME = UCS_BIT(8)
        Assert.Equal(64ul, Ucp.WorkerParamFieldName);                          // UCP_WORKER_PARAM_FIELD_NAME = UCS_BIT(6)
        Assert.Equal(0, Ucp.ThreadModeSingle);                                 // ucs_thread_mode_t
        Assert.Equal(128ul, Ucp.EpParamFieldName);                             // UCP_EP_PARAM_FIELD_NAME = UCS_BIT(7)
        Assert.Equal(1, Ucp.ErrHandlingModePeer);                              // ucp_def.h ucp_err_handling_mode_t
        Assert.Equal((256u, 512u), (Ucp.ProtRemoteRead, Ucp.ProtRemoteWrite)); // UCP_MEM_MAP_PROT_REMOTE_READ/WRITE = UCS_BIT(8)/(9)
        Assert.Equal(2u, Ucp.MemMapAllocate);                                  // UCP_MEM_MAP_ALLOCATE = UCS_BIT(1)
        Assert.Equal((16ul, 4ul, 1), (Ucp.MemMapFieldMemoryType, Ucp.AttrFieldMemoryTypes, Ucp.MemoryTypeCuda)); // FIELD_MEMORY_TYPE = UCS_BIT(4), UCP_ATTR_FIELD_MEMORY_TYPES = UCS_BIT(2), UCS_MEMORY_TYPE_CUDA
        Assert.Equal((1ul, 2ul), (Ucp.MemAttrFieldAddress, Ucp.MemAttrFieldLength)); // ucp_mem_attr_field ADDRESS/LENGTH
        Assert.Equal(16u, Ucp.OpAttrFlags);                                    // UCP_OP_ATTR_FIELD_FLAGS = UCS_BIT(4)
        Assert.Equal((1u, 2u), (Ucp.AmSendFlagReply, Ucp.AmSendFlagEager));    // UCP_AM_SEND_FLAG_REPLY/EAGER
        Assert.Equal((65536ul, 131072ul), (Ucp.AmRecvAttrFlagData, Ucp.AmRecvAttrFlagRndv)); // UCP_AM_RECV_ATTR_FLAG_DATA/RNDV = UCS_BIT(16)/(17)
        Assert.Equal(-100, Ucp.ErrLast);                                       // ucs/type/status.h UCS_ERR_LAST
    }

    [Fact]
    public void Transports_are_parsed_from_ucp_ep_print_info_lanes()
    {
        const string info = """
            #
            # UCP endpoint
            #
            #               peer: <no debug data>
            #                 lane[0]:  1:posix/memory.0 md[1]           -> md[1]/posix/sysdev[255] rma_bw#0 am am_bw#0
            #                 lane[1]:  4:tcp/lo.0 md[3]                 -> md[3]/tcp/sysdev[255] rma_bw#1 wireup
            #                 lane[2]:  0:rc_mlx5/mlx5_0:1.0 md[0]       -> md[0]/ib/sysdev[255] rma_bw#2
            """;
        Assert.Equal(["posix/memory.0", "tcp/lo.0", "rc_mlx5/mlx5_0:1.0"], UcxWorker.ParseTransports(info));
    }
}
