"""The generic API's request bodies: JSON or multipart in, one validated ``MessageIn`` out.

Bodies arrive in chunks (``Body.feed``): a multipart body is parsed as it streams in, so a 20 MB
screenshot is never held twice, and the same parser serves signed and unsigned requests.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Iterable
from typing import Annotated, Any
from urllib.parse import parse_qsl

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    ValidationError,
    model_validator,
)
from python_multipart.multipart import MultipartParser, parse_options_header

from adapters.http_body import parse_json
from core.errors import BadInput, TooLarge

__all__ = [
    "Body",
    "ImageIn",
    "MessageIn",
    "decode_base64_image",
    "refuse_unknown",
]

MAX_IMAGES = 16
TEXT_LIMIT = 32_000

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Strict(BaseModel):
    # A typo ("image" for "images") must be refused, not silently dropped with what it carried.
    model_config = ConfigDict(extra="forbid")


class SenderIn(_Strict):
    id: Annotated[str, StringConstraints(max_length=256)] = ""
    name: Annotated[str, StringConstraints(max_length=256)] = ""


class ImageIn(_Strict):
    data: str | None = None  # base64 (whitespace and base64url allowed), or a data: URL
    url: HttpUrl | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ImageIn:
        if (self.data is None) == (self.url is None):
            raise ValueError('each image needs exactly one of "data" (base64) or "url"')
        return self


class MessageIn(_Strict):
    conversation_id: Id
    message_id: Id | None = None
    reply_to: Id | None = None
    thread_id: Id | None = None
    sender: SenderIn = Field(default_factory=SenderIn)
    text: Annotated[str, StringConstraints(max_length=TEXT_LIMIT)] = ""
    images: list[ImageIn] = Field(default_factory=list, max_length=MAX_IMAGES)
    wait: bool = False
    callback_url: HttpUrl | None = None


def refuse_unknown(given: Iterable[str], known: Iterable[str], what: str = "field") -> None:
    """400 naming the first unknown name, and the closest known one."""
    known = list(known)
    for name in given:
        if name not in known:
            raise BadInput(f"unknown {what} {name!r}{_closest(name, known)}", code="unknown_field")


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if known else " (none are taken here)"


class Body:
    """A request body fed chunk by chunk; ``message()`` validates it once it is complete."""

    def __init__(self, content_type: str, content_type_header: str) -> None:
        self._bytes = bytearray()
        self._form: _Form | None = None
        self._content_type = content_type
        if content_type == "multipart/form-data":
            self._form = _Form(content_type_header)
        elif content_type not in {"application/json", "application/x-www-form-urlencoded"}:
            raise BadInput(
                f"unsupported content type {content_type!r}: send application/json or multipart/form-data",
                code="unsupported_content_type",
            )

    def feed(self, chunk: bytes) -> None:
        if self._form is not None:
            self._form.feed(chunk)
        else:
            self._bytes += chunk

    async def message(self) -> tuple[MessageIn, list[bytes]]:
        """The validated message, and the uploaded files' bytes in order."""
        if self._form is not None:
            fields, files = _form_fields(self._form.close())
            return _validate(fields), files
        body = bytes(self._bytes)
        if self._content_type == "application/x-www-form-urlencoded":  # curl -d, a form without files
            try:
                pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                                  max_num_fields=64)
            except (UnicodeDecodeError, ValueError) as exc:
                raise BadInput(f"malformed form body: {exc}", code="malformed_form") from None
            fields, _ = _form_fields([_Part(name, value.encode()) for name, value in pairs])
            return _validate(fields), []
        raw = await parse_json(body, code="malformed_json")
        if not isinstance(raw, dict):
            raise BadInput("body must be a JSON object", code="malformed_json")
        return _validate(raw), []


_WHITESPACE = re.compile(rb"\s+")
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def decode_base64_image(data: str, max_bytes: int) -> bytes:
    """Standard base64 or base64url, padded or not, wrapped or not (``base64`` without ``-w0``)."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    # base64 grows by 4/3: refuse before decoding what would be over the limit.
    if len(data) * 3 // 4 > max_bytes * 1.05 + 3:  # 5 %: line breaks of wrapped base64
        raise TooLarge(f"image is over the {max_bytes}-byte limit")
    try:
        packed = _WHITESPACE.sub(b"", data.encode("ascii")).translate(_URLSAFE)
        decoded = base64.b64decode(packed + b"=" * (-len(packed) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("image data is not valid base64 (standard or URL-safe alphabet)",
                       code="malformed_image_data") from None
    if len(decoded) > max_bytes:
        raise TooLarge(f"image is over the {max_bytes}-byte limit")
    return decoded


def _validate(raw: dict[str, Any]) -> MessageIn:
    try:
        return MessageIn.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        if error["type"] == "extra_forbidden":
            model: type[BaseModel] = MessageIn
            if len(error["loc"]) > 1:
                model = SenderIn if error["loc"][0] == "sender" else ImageIn
            known = list(model.model_fields)
            raise BadInput(f"unknown field {where!r}{_closest(str(error['loc'][-1]), known)}",
                           code="unknown_field") from None
        message = "required" if error["type"] == "missing" else error["msg"]
        raise BadInput(f"{where}: {message}", code="invalid_field") from None


# ---- multipart/form-data --------------------------------------------------------------------

_TEXT_FIELDS = ("conversation_id", "message_id", "reply_to", "thread_id", "text", "callback_url")
_FORM_FIELDS = (*_TEXT_FIELDS, "wait", "sender_id", "sender_name", "image_url", "image", "images", "file")
_IMAGE_PARTS = frozenset({"image", "images", "file"})  # bytes or, as text, an image URL
_MAX_TEXT_PART = 64 * 1024


class _Part:
    __slots__ = ("data", "filename", "headers", "name")

    def __init__(self, name: str = "", data: bytes = b"") -> None:
        self.headers: dict[bytes, bytes] = {}
        self.data = bytearray(data)
        self.name = name
        self.filename: str | None = None


def _form_fields(parts: list[_Part]) -> tuple[dict[str, Any], list[bytes]]:
    """A form's parts as the JSON body's fields, and the image files' bytes in order."""
    fields: dict[str, Any] = {}
    urls: list[dict[str, str]] = []
    files: list[bytes] = []
    refuse_unknown((p.name for p in parts if p.filename is None), _FORM_FIELDS, "form field")
    for part in parts:
        if part.filename is not None or part.name in _IMAGE_PARTS:
            url = _as_url(part)
            if url is not None:
                urls.append({"url": url})
            else:
                files.append(bytes(part.data))
            continue
        value = _text(part)
        if part.name in _TEXT_FIELDS:
            fields[part.name] = value
        elif part.name == "wait":
            fields["wait"] = value.strip().lower() in {"1", "true", "yes", "on"}
        elif part.name == "sender_id":
            fields.setdefault("sender", {})["id"] = value
        elif part.name == "sender_name":
            fields.setdefault("sender", {})["name"] = value
        else:  # image_url
            urls.append({"url": value.strip()})
    if urls:
        fields["images"] = urls
    if len(files) + len(urls) > MAX_IMAGES:
        raise BadInput(f"at most {MAX_IMAGES} images per message", code="invalid_field")
    return fields, files


class _Form:
    """A multipart/form-data body parsed as it streams in.

    A part is an image by its content, not by having a filename: ``curl -F image=@x.png``, a part
    with no filename and ``Content-Type: image/png``, and raw bytes under ``image`` all count.
    """

    def __init__(self, content_type_header: str) -> None:
        _, options = parse_options_header(content_type_header)
        boundary = options.get(b"boundary")
        if not boundary:
            raise BadInput("multipart body without a boundary in its Content-Type",
                           code="malformed_multipart")
        self._parts: list[_Part] = []
        self._part: _Part | None = None
        self._field, self._value = bytearray(), bytearray()
        self._ended = False
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        })

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except BadInput:
            raise
        except Exception as exc:  # the parser's own errors, on junk
            raise BadInput(f"malformed multipart body: {exc}", code="malformed_multipart") from None

    def close(self) -> list[_Part]:
        if not self._ended:
            raise BadInput("multipart body ends before its closing boundary", code="malformed_multipart")
        return self._parts

    # parser callbacks

    def _begin(self) -> None:
        if len(self._parts) >= 64:
            raise BadInput("more than 64 parts in a multipart body", code="malformed_multipart")
        self._part = _Part()
        self._parts.append(self._part)

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.data += data[start:end]

    def _header_end(self) -> None:
        assert self._part is not None
        self._part.headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        assert self._part is not None
        disposition, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise BadInput("a multipart part without Content-Disposition: form-data; name=...",
                           code="malformed_multipart")
        self._part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            self._part.filename = options[b"filename"].decode("utf-8", "replace")

    def _end(self) -> None:
        self._ended = True


def _text(part: _Part) -> str:
    if len(part.data) > _MAX_TEXT_PART:
        raise BadInput(f"{part.name}: over {_MAX_TEXT_PART} bytes for a text field", code="invalid_field")
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{part.name}: not UTF-8 text (send images as `image` parts)", code="invalid_field") from None


def _as_url(part: _Part) -> str | None:
    """An image part that holds an http(s) URL rather than image bytes."""
    if part.filename is not None or len(part.data) > 8192:
        return None
    head = bytes(part.data[:8]).lower()
    if not (head.startswith((b"http://", b"https://"))):
        return None
    try:
        return part.data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
