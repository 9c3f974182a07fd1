"""The generic API's request bodies: JSON or multipart in, one validated ``MessageIn`` out."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from aiohttp import BodyPartReader, MultipartReader, StreamReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    ValidationError,
    model_validator,
)

from core.errors import BadInput, TooLarge

__all__ = ["ImageIn", "MessageIn", "decode_base64_image", "off_loop", "parse_body"]

# Parsing and decoding more than this many bytes is done on a thread, not on the event loop:
# a 30 MB JSON body with base64 images takes the loop away for a tenth of a second or more.
_ON_LOOP_BYTES = 64 * 1024


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, on a thread when ``size`` bytes make it slow enough to stall the loop."""
    if size > _ON_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)

T = TypeVar("T")
Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class SenderIn(BaseModel):
    id: Annotated[str, StringConstraints(max_length=256)] = ""
    name: Annotated[str, StringConstraints(max_length=256)] = ""


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str | None = None  # base64, or a data: URL
    url: HttpUrl | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ImageIn:
        if (self.data is None) == (self.url is None):
            raise ValueError('each image needs exactly one of "data" (base64) or "url"')
        return self


class MessageIn(BaseModel):
    conversation_id: Id
    message_id: Id | None = None
    reply_to: Id | None = None
    thread_id: Id | None = None
    sender: SenderIn = Field(default_factory=SenderIn)
    text: Annotated[str, StringConstraints(max_length=32_000)] = ""
    images: list[ImageIn] = Field(default_factory=list, max_length=16)
    wait: bool = False
    callback_url: HttpUrl | None = None


async def parse_body(body: bytes, content_type: str, content_type_header: str) -> tuple[MessageIn, list[bytes]]:
    """Parse a JSON or multipart body; uploaded files come back as raw bytes, in order."""
    if content_type == "application/json":
        try:
            raw = await off_loop(len(body), json.loads, body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"body is not valid JSON: {exc}", code="malformed_json") from None
        if not isinstance(raw, dict):
            raise BadInput("body must be a JSON object", code="malformed_json")
        return _validate(raw), []
    if content_type == "multipart/form-data":
        fields, files = await _read_multipart(body, content_type_header)
        return _validate(fields), files
    raise BadInput(
        f"unsupported content type {content_type!r}: send application/json or multipart/form-data",
        code="unsupported_content_type",
    )


def decode_base64_image(data: str, max_bytes: int) -> bytes:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    # base64 grows by 4/3: refuse before decoding what would be over the limit.
    if len(data) * 3 // 4 > max_bytes + 3:
        raise TooLarge(f"image is over the {max_bytes}-byte limit")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("image data is not valid base64", code="malformed_image_data") from None


def _validate(raw: dict[str, Any]) -> MessageIn:
    try:
        return MessageIn.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        message = "required" if error["type"] == "missing" else error["msg"]
        raise BadInput(f"{where}: {message}", code="invalid_field") from None


_TEXT_FIELDS = ("conversation_id", "message_id", "reply_to", "thread_id", "text", "callback_url")


async def _read_multipart(body: bytes, content_type_header: str) -> tuple[dict[str, Any], list[bytes]]:
    """Form fields and files of a multipart body already read (and signature-checked) as bytes."""
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    fields: dict[str, Any] = {}
    urls: list[dict[str, str]] = []
    files: list[bytes] = []
    try:
        reader = MultipartReader(CIMultiDict({"Content-Type": content_type_header}), stream)  # no boundary: raises
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadInput("nested multipart is not supported", code="malformed_multipart")
            data = bytes(await part.read(decode=True))
            if part.filename is not None:
                files.append(data)
                continue
            value = data.decode("utf-8", "strict")
            if part.name in _TEXT_FIELDS:
                fields[part.name] = value
            elif part.name == "wait":
                fields["wait"] = value.strip().lower() in {"1", "true", "yes", "on"}
            elif part.name == "sender_id":
                fields.setdefault("sender", {})["id"] = value
            elif part.name == "sender_name":
                fields.setdefault("sender", {})["name"] = value
            elif part.name in {"image_url", "images"}:
                urls.append({"url": value})
    except BadInput:
        raise
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:  # aiohttp's parser on junk
        raise BadInput(f"malformed multipart body: {exc}", code="malformed_multipart") from None
    if urls:
        fields["images"] = urls
    if len(files) + len(urls) > 16:
        raise BadInput("at most 16 images per message", code="invalid_field")
    return fields, files
