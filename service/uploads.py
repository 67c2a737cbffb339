"""Reading uploads safely: the body limit is enforced before and while reading (uvicorn has
none, and Starlette's multipart limits do not cap file parts), the content type decides how the
body is parsed, and every problem becomes a clear 4xx."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

RAW_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/bmp",
        "image/x-ms-bmp",
        "image/webp",
        "image/tiff",
        "application/octet-stream",
    }
)
MULTIPART = "multipart/form-data"
FILE_FIELDS = ("file", "files")
MAX_FORM_FIELDS = 16
HOW_TO_SEND = (
    "send the image as the raw body with its type (curl: -H 'Content-Type: image/png' "
    "--data-binary @image.png) or as the multipart field 'file' (curl: -F file=@image.png)"
)


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None = None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise HTTPException(400, "Content-Length is not a number") from None
        if length > limit:
            raise HTTPException(413, f"the body has {length} bytes; at most {limit} are accepted")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_parts(request: Request, body: bytes, max_files: int) -> list[Upload]:
    """The file parts of a multipart body already read (and size-checked) into memory."""

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=max_files + 1, max_fields=MAX_FORM_FIELDS, max_part_size=len(body) + 1
        )
    except (StarletteHTTPException, ValueError) as err:  # Starlette's and python-multipart's
        detail = getattr(err, "detail", None) or str(err)
        raise HTTPException(400, f"the multipart body cannot be parsed: {detail}") from None
    uploads = []
    for name in FILE_FIELDS:
        for value in form.getlist(name):
            if not isinstance(value, UploadFile):
                raise HTTPException(422, f"the multipart field {name!r} must be a file")
            uploads.append(Upload(await value.read(), value.filename))
            await value.close()
    await form.close()
    return uploads


async def read_images(request: Request, limit: int, max_files: int) -> list[Upload]:
    """The image(s) of a request: one raw body, or the file parts of a multipart form."""
    kind = media_type(request)
    if kind == MULTIPART:
        body = await read_body(request, limit)
        uploads = await _form_parts(request, body, max_files)
        if not uploads:
            raise HTTPException(422, f"the multipart body has no 'file' part; {HOW_TO_SEND}")
        if len(uploads) > max_files == 1:
            raise HTTPException(422, "send one image; /predict/batch takes several")
        if len(uploads) > max_files:
            raise HTTPException(413, f"{len(uploads)} files sent; at most {max_files} accepted")
        return uploads
    if kind and kind not in RAW_TYPES:
        raise HTTPException(415, f"Content-Type {kind!r} is not accepted; {HOW_TO_SEND}")
    return [Upload(await read_body(request, limit))]
