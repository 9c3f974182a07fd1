"""Feishu's long-connection frames: protobuf ``pbbp2.Frame`` (proto2), the schema lark-oapi's
``ws/pb/pbbp2.proto`` declares (PROTOCOLS.md §1.10, §7). Built with protobuf's descriptor API:
the same wire format as generated code, without a generated file or protoc.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

__all__ = ["CONTROL", "DATA", "DecodeError", "Frame", "headers_of", "make_frame"]

CONTROL, DATA = 0, 1  # Frame.method

_F = descriptor_pb2.FieldDescriptorProto


def _frame_class() -> type[Message]:
    file = descriptor_pb2.FileDescriptorProto(name="imsight/pbbp2.proto", package="pbbp2", syntax="proto2")
    header = file.message_type.add(name="Header")
    for number, name in ((1, "key"), (2, "value")):
        header.field.add(name=name, number=number, type=_F.TYPE_STRING, label=_F.LABEL_REQUIRED)
    frame = file.message_type.add(name="Frame")
    for number, name, kind, label in (
        (1, "SeqID", _F.TYPE_UINT64, _F.LABEL_REQUIRED),
        (2, "LogID", _F.TYPE_UINT64, _F.LABEL_REQUIRED),
        (3, "service", _F.TYPE_INT32, _F.LABEL_REQUIRED),
        (4, "method", _F.TYPE_INT32, _F.LABEL_REQUIRED),
        (5, "headers", _F.TYPE_MESSAGE, _F.LABEL_REPEATED),
        (6, "payload_encoding", _F.TYPE_STRING, _F.LABEL_OPTIONAL),
        (7, "payload_type", _F.TYPE_STRING, _F.LABEL_OPTIONAL),
        (8, "payload", _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
        (9, "LogIDNew", _F.TYPE_STRING, _F.LABEL_OPTIONAL),
    ):
        field = frame.field.add(name=name, number=number, type=kind, label=label)
        if kind == _F.TYPE_MESSAGE:
            field.type_name = ".pbbp2.Header"
    pool = descriptor_pool.DescriptorPool()  # our own: lark-oapi's copy may be loaded in the same process
    pool.Add(file)
    frame_class: type[Message] = message_factory.GetMessageClass(pool.FindMessageTypeByName("pbbp2.Frame"))
    return frame_class


Frame = _frame_class()


def make_frame(method: int, service: int, headers: dict[str, str], payload: bytes = b"", *, seq_id: int = 0,
               log_id: int = 0) -> Any:
    frame: Any = Frame(SeqID=seq_id, LogID=log_id, service=service, method=method, payload=payload)
    for key, value in headers.items():
        frame.headers.add(key=key, value=value)
    return frame


def headers_of(frame: Any) -> dict[str, str]:
    return {header.key: header.value for header in frame.headers}
