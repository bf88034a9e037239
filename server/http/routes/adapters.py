"""Adapter management: upload, list, inspect, delete.

Upload (multipart/form-data): an `adapter_id` field plus the folder's two files
(`adapter_config.json`, `adapter_model.safetensors`, recognised by file name) or one archive of the
folder (.tar.gz/.tgz/.tar/.zip). Everything is validated against this server's base model and basis
before anything is stored.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters.archive import MAX_CONFIG_BYTES, ArchiveError, ArchiveTooLarge, unpack_adapter_archive
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterValidationError, separate_model_refusal
from adapters.store import AdapterIdError, AdapterInfo, DamagedAdapterError, check_adapter_id
from server.http.deps import get_state, require_admin_key, require_api_key
from server.http.errors import APIError, clip
from server.http.schemas import UPLOAD_BODY, AdapterList, AdapterOut, ErrorResponse
from server.http.state import ServerState

router = APIRouter(tags=["adapters"], dependencies=[Depends(require_api_key)])
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_PROBLEM_CHARS = 300


def already_exists(adapter_id: str) -> APIError:
    return APIError(409, f"adapter {adapter_id!r} already exists; delete it first to replace it", "adapter_id")


def not_found(adapter_id: str) -> APIError:
    return APIError(404, f"adapter {adapter_id!r} not found", "adapter_id")


def adapter_out(info: AdapterInfo) -> AdapterOut:
    return AdapterOut(id=info.id, method=info.method, r=info.r, groups=info.target_modules, num_params=info.num_params,
                      size_bytes=info.size_bytes, checksum=info.checksum, created=info.created, base_model=info.base_model)


async def read_files(uploads: dict[str, UploadFile], state: ServerState) -> dict[str, bytes]:
    """The two adapter files' bytes, from the parts themselves or unpacked (off the event loop) from one
    archive; a weights file larger than any this server accepts is refused before it is read."""
    max_weights = state.store.expect.max_weights_bytes
    if len(uploads) == 1 and next(iter(uploads)).lower().endswith(ARCHIVE_SUFFIXES):
        name, upload = next(iter(uploads.items()))
        try:
            return await run_in_threadpool(unpack_adapter_archive, name, upload.file,
                                           state.config.server.max_unpacked_bytes, max_weights)
        except ArchiveTooLarge as exc:
            raise APIError(413, str(exc), "files") from exc
        except ArchiveError as exc:
            raise APIError(400, str(exc), "files") from exc
    weights = uploads.get(WEIGHTS_FILE)
    if weights is not None and weights.size is not None and weights.size > max_weights:
        config = uploads.get(CONFIG_FILE)
        refusal = separate_model_refusal(await config.read(MAX_CONFIG_BYTES)) if config is not None else None
        if refusal is not None:  # a separate model (CERSA) is as large as one: say what to do with it instead
            raise APIError(400, "invalid adapter: " + refusal, "files")
        raise APIError(413, f"{WEIGHTS_FILE} is {weights.size} bytes, more than this server accepts ({max_weights} bytes)",
                       "files")
    return {name: await upload.read() for name, upload in uploads.items()}


async def read_upload(request: Request, state: ServerState) -> tuple[str, dict[str, bytes]]:
    limits = state.config.server
    length = request.headers.get("content-length")
    if length is None:
        raise APIError(411, "uploads must send a Content-Length header")
    if not length.isdigit() or int(length) > limits.max_upload_bytes:
        raise APIError(413, f"upload is larger than the limit of {limits.max_upload_bytes} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "upload must be multipart/form-data with an adapter_id field and the adapter files")
    try:
        form = await request.form(max_files=4, max_fields=8, max_part_size=limits.max_upload_bytes)
    except Exception as exc:  # malformed multipart bodies
        raise APIError(400, f"could not parse the multipart upload: {exc}") from exc
    try:
        adapter_id = form.get("adapter_id")
        if not isinstance(adapter_id, str) or not adapter_id:
            raise APIError(400, "missing form field adapter_id", "adapter_id")
        uploads = {}
        for upload in (v for _, v in form.multi_items() if isinstance(v, UploadFile)):
            name = (upload.filename or "").rsplit("/", 1)[-1]
            if name in uploads:
                raise APIError(400, f"upload holds {name or 'a file without a name'} more than once", "files")
            uploads[name] = upload
        files = await read_files(uploads, state)
    finally:
        await form.close()
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in files]
    if missing:
        raise APIError(400, f"upload lacks {missing}: send both files by these names, or one archive of the folder", "files")
    return adapter_id, files


@router.post("/v1/adapters", status_code=201, response_model=AdapterOut, dependencies=[Depends(require_admin_key)],
             responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 411, 413, 503)},
             openapi_extra={"requestBody": UPLOAD_BODY})  # the route parses the multipart form itself
async def upload_adapter(request: Request, state: ServerState = Depends(get_state)):
    """Upload an adapter (see the module docstring); 201 with its summary."""
    adapter_id, files = await read_upload(request, state)
    if adapter_id == state.model_name:
        raise APIError(400, f"adapter id {adapter_id!r} is the base model's name", "adapter_id")
    try:
        check_adapter_id(adapter_id)
    except AdapterIdError as exc:
        raise APIError(400, str(exc), "adapter_id") from exc
    if adapter_id in state.store:  # cheap early answer; the store checks again under its lock
        raise already_exists(adapter_id)
    try:
        info = await run_in_threadpool(state.store.put, adapter_id, files[CONFIG_FILE], files[WEIGHTS_FILE])
    except AdapterValidationError as exc:
        problems = [clip(problem, MAX_PROBLEM_CHARS) for problem in exc.problems]  # each may echo a huge value
        raise APIError(400, "invalid adapter: " + "; ".join(problems), "files") from exc
    except FileExistsError as exc:
        raise already_exists(adapter_id) from exc
    state.adapter_stored(adapter_id, info.checksum)
    return adapter_out(info)


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(state: ServerState = Depends(get_state)):
    infos = []
    for adapter_id in state.store.ids():
        try:
            infos.append(adapter_out(state.store.info(adapter_id)))
        except (KeyError, DamagedAdapterError):  # deleted meanwhile, or damaged (logged and counted)
            continue
    return AdapterList(data=infos)


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterOut, responses={404: {"model": ErrorResponse}})
async def get_adapter(adapter_id: str, state: ServerState = Depends(get_state)):
    try:
        return adapter_out(state.store.info(adapter_id))
    except KeyError:
        raise not_found(adapter_id) from None
    except DamagedAdapterError as exc:
        raise APIError(500, str(exc), "adapter_id") from exc


@router.delete("/v1/adapters/{adapter_id}", status_code=204, dependencies=[Depends(require_admin_key)],
               responses={404: {"model": ErrorResponse}})
async def delete_adapter(adapter_id: str, state: ServerState = Depends(get_state)):
    """Delete an adapter. Requests already running on it finish; new ones get 404."""
    try:
        state.store.delete(adapter_id)
    except KeyError:
        raise not_found(adapter_id) from None
    state.adapter_deleted(adapter_id)
    return Response(status_code=204)
