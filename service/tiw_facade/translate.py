"""Proto messages ↔ TIW JSON, driven by the message descriptors' JSON names.

The proto contract gives every field TIW's parameter name as its ``json_name``, so one walk over the
descriptor serves all five actions in both directions. Why not ``google.protobuf.json_format``: its
canonical mapping writes 64-bit integers as JSON strings, and TIW wants integers ("integers stay
integers"); it also rejects unknown fields by default and is slower than this walk.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})


class MalformedAnswer(ValueError):
    """TIW answered a field with a value of the wrong JSON type; the message names the field."""


def to_tiw(message: Message) -> dict[str, Any]:
    """The TIW JSON object for ``message``: only fields that are set, named by their JSON names."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            out[field.json_name] = [to_tiw(v) for v in value] if field.is_repeated else to_tiw(value)
        else:
            out[field.json_name] = list(value) if field.is_repeated else value
    return out


def from_tiw(data: Mapping[str, Any], message_class: type[M]) -> M:
    """Build ``message_class`` from a TIW JSON object.

    Unknown names are ignored (TIW's API grows); JSON ``null`` leaves the field absent. A value of
    the wrong JSON type raises ``MalformedAnswer``.
    """
    message = message_class()
    _merge(data, message, "")
    return message


@functools.cache
def _fields_by_json_name(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    return {field.json_name: field for field in descriptor.fields}


def _merge(data: Mapping[str, Any], message: Message, path: str) -> None:
    if not isinstance(data, Mapping):
        raise MalformedAnswer(f"{path or 'Response'}: expected a JSON object, got {type(data).__name__}")
    fields = _fields_by_json_name(message.DESCRIPTOR)
    for name, value in data.items():
        field = fields.get(name)
        if field is None or value is None:
            continue
        where = f"{path}.{name}" if path else name
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                container = getattr(message, field.name)
                for index, item in enumerate(_as_list(value, where)):
                    _merge(item, container.add(), f"{where}[{index}]")
            else:
                child = getattr(message, field.name)
                child.SetInParent()  # present even when TIW sent an empty object
                _merge(value, child, where)
        else:
            try:
                if field.is_repeated:
                    items = _as_list(value, where)
                    getattr(message, field.name).extend(
                        _scalar(field, v, f"{where}[{i}]") for i, v in enumerate(items)
                    )
                else:
                    setattr(message, field.name, _scalar(field, value, where))
            except (ValueError, TypeError) as exc:  # e.g. a negative number for an unsigned field
                if isinstance(exc, MalformedAnswer):
                    raise
                raise MalformedAnswer(f"{where}: {exc}") from None


def _as_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedAnswer(f"{where}: expected a JSON array, got {type(value).__name__}")
    return [item for item in value if item is not None]


def _scalar(field: FieldDescriptor, value: Any, where: str) -> Any:
    kind = field.type
    if kind in _INTEGER_TYPES:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == FieldDescriptor.TYPE_STRING:
        ok = isinstance(value, str)
    elif kind == FieldDescriptor.TYPE_BOOL:
        ok = isinstance(value, bool)
    elif kind in _FLOAT_TYPES:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:  # bytes and enums are not used by TIW's API
        ok = False
    if not ok:
        raise MalformedAnswer(f"{where}: unexpected JSON value of type {type(value).__name__}")
    return value
