"""The standard error details (google.rpc) a failed call's rich status carries."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
)


def unpack_details(status: status_pb2.Status) -> dict[str, Message]:
    """The standard error details a google.rpc.Status carries, by type name."""
    found: dict[str, Message] = {}
    for item in status.details:
        for kind in DETAIL_TYPES:
            if item.Is(kind.DESCRIPTOR):
                message = kind()
                item.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


def details(error: grpc.aio.AioRpcError) -> dict[str, Message]:
    """The details of a failed call, by type name; it must carry a rich status."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status: {error.code()} {error.details()}"
    return unpack_details(status)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = details(error)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


def reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo's reason: the facade's code for the failure."""
    code: str = error_info(error).reason
    return code
