"""The services every facade serves besides its own: grpc.health.v1 (with the List that
grpcio-health-checking advertises but leaves UNIMPLEMENTED) and server reflection, v1alpha and v1.

Written here only where the maintained libraries stop short for grpc.aio: the List method, and v1
reflection, which grpcio-reflection does not serve.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc is untyped
    """grpcio-health-checking's servicer, plus the List it advertises but answers UNIMPLEMENTED."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        # _server_status is the base class's (annotated) table of every service set so far.
        return health_pb2.HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in self._server_status.items()
            }
        )


def add_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Server reflection v1alpha (grpcio-reflection) and v1, which buf curl and grpcurl try first.

    grpcio-reflection serves only v1alpha; v1 is the same protocol renamed, its messages
    field-for-field identical, so the same servicer answers it through v1alpha's (de)serializers.
    """
    services = (*services, reflection.SERVICE_NAME, REFLECTION_V1)
    _describe_reflection_v1()
    reflection.enable_server_reflection(services, server)
    servicer = reflection.aio.ReflectionServicer(services)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": info}),)
    )


def _describe_reflection_v1() -> None:
    """Put v1's schema in the default pool, so reflection can describe v1 itself (as buf curl asks).

    It is v1alpha's file with the package renamed. Adding the same file again is a no-op.
    """
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    file = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    file.name, file.package = "grpc/reflection/v1/reflection.proto", new.strip(".")
    for message in file.message_type:  # the messages nest nothing
        for field in message.field:
            if field.type_name.startswith(old):  # assigning "" would set it: only message fields
                field.type_name = field.type_name.replace(old, new)
    for method in file.service[0].method:
        method.input_type, method.output_type = (
            t.replace(old, new) for t in (method.input_type, method.output_type)
        )
    descriptor_pool.Default().AddSerializedFile(file.SerializeToString())
