"""Proto messages ↔ TIW JSON, driven by the message descriptors' JSON names.

The proto contract gives every field TIW's parameter name as its ``json_name``, so one walk over the
descriptor serves all five actions in both directions. Why not ``google.protobuf.json_format``: its
canonical mapping writes 64-bit integers as JSON strings, and TIW wants integers ("integers stay
integers"); it also rejects unknown fields by default and is slower than this walk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

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


class _Slot(NamedTuple):
    """How one JSON name lands in a message, worked out once per message type."""

    name: str  # the proto field name
    message: bool  # a message (or list of messages) rather than scalars
    repeated: bool
    accepts: Callable[[Any], bool]  # does a JSON value have this field's type?


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_string(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_object(value: Any) -> bool:
    return isinstance(value, Mapping)


def _accepts(field: FieldDescriptor) -> Callable[[Any], bool]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _is_object
    if field.type in _INTEGER_TYPES:
        return _is_integer
    if field.type in _FLOAT_TYPES:
        return _is_number
    if field.type == FieldDescriptor.TYPE_STRING:
        return _is_string
    if field.type == FieldDescriptor.TYPE_BOOL:
        return _is_bool
    return lambda _: False  # bytes and enums are not used by TIW's API


@functools.cache
def _plan(descriptor: Descriptor) -> dict[str, _Slot]:
    return {
        field.json_name: _Slot(
            field.name, field.type == FieldDescriptor.TYPE_MESSAGE, field.is_repeated, _accepts(field)
        )
        for field in descriptor.fields
    }


def _merge(data: Mapping[str, Any], message: Message, path: str) -> None:
    if not isinstance(data, Mapping):
        raise MalformedAnswer(f"{path or 'Response'}: expected a JSON object, got {type(data).__name__}")
    plan = _plan(message.DESCRIPTOR)
    for name, value in data.items():
        slot = plan.get(name)
        if slot is None or value is None:
            continue
        if slot.repeated:
            if not isinstance(value, list):
                raise MalformedAnswer(
                    f"{_where(path, name)}: expected a JSON array, got {type(value).__name__}"
                )
            items = [item for item in value if item is not None]
            for index, item in enumerate(items):
                if not slot.accepts(item):
                    raise _wrong_type(f"{_where(path, name)}[{index}]", item)
            container = getattr(message, slot.name)
            if slot.message:
                for index, item in enumerate(items):
                    _merge(item, container.add(), f"{_where(path, name)}[{index}]")
            else:
                try:
                    container.extend(items)
                except (ValueError, TypeError) as exc:  # e.g. a negative number for an unsigned field
                    raise MalformedAnswer(f"{_where(path, name)}: {exc}") from None
        elif not slot.accepts(value):
            raise _wrong_type(_where(path, name), value)
        elif slot.message:
            child = getattr(message, slot.name)
            child.SetInParent()  # present even when TIW sent an empty object
            _merge(value, child, _where(path, name))
        else:
            try:
                setattr(message, slot.name, value)
            except (ValueError, TypeError) as exc:  # e.g. a negative number for an unsigned field
                raise MalformedAnswer(f"{_where(path, name)}: {exc}") from None


def _where(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _wrong_type(where: str, value: Any) -> MalformedAnswer:
    return MalformedAnswer(f"{where}: unexpected JSON value of type {type(value).__name__}")
