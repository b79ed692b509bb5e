"""/v1/calibration: upload a calibration file (.txt or .jsonl) for jobs of the same team
(`calibration: {"dataset": "upload", "upload_id": ...}`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, HTTPException, UploadFile

from api.auth import Reader, Submitter
from api.deps import SessionDep, SettingsDep
from api.schemas import ERROR_BODY, UploadOut
from jobs.models import CalibrationUpload
from jobs.uploads import UploadRejected, store_upload

router = APIRouter(prefix="/v1/calibration", tags=["calibration"])


def _out(row: CalibrationUpload) -> UploadOut:
    return UploadOut(
        upload_id=row.id,
        filename=row.filename,
        format=row.format,
        size=row.size_bytes,
        sha256=row.sha256,
        lines=row.lines,
        created_at=row.created_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=UploadOut,
    operation_id="upload_calibration",
    responses={
        201: {
            "links": {
                "GetUpload": {
                    "operationId": "get_calibration",
                    "parameters": {"upload_id": "$response.body#/upload_id"},
                }
            }
        },
        400: {"description": "The body is not valid multipart/form-data.", **ERROR_BODY},
        401: {"description": "No API token, or an unknown or revoked one.", **ERROR_BODY},
        403: {"description": "The token lacks the submit scope.", **ERROR_BODY},
        413: {"description": "Larger than QF_CALIBRATION_MAX_BYTES.", **ERROR_BODY},
        422: {"description": "Not a .txt/.jsonl UTF-8 text file.", **ERROR_BODY},
    },
)
def upload_calibration(
    file: Annotated[UploadFile, File(description="A .txt or .jsonl file (UTF-8).")],
    session: SessionDep,
    settings: SettingsDep,
    principal: Submitter,
) -> UploadOut:
    limit = settings.calibration_max_bytes
    data = file.file.read(limit + 1)  # the spooled upload; never more than the limit in memory
    if len(data) > limit:
        raise HTTPException(413, f"file: larger than the limit of {limit} bytes")
    try:
        row = store_upload(
            session, principal.team, principal.name, file.filename or "", data, limit
        )
    except UploadRejected as e:
        raise HTTPException(422, str(e)) from e
    session.commit()
    return _out(row)


@router.get(
    "/{upload_id}",
    response_model=UploadOut,
    operation_id="get_calibration",
    responses={404: {"description": "No such upload in the caller's team.", **ERROR_BODY}},
)
def get_calibration(upload_id: str, session: SessionDep, principal: Reader) -> UploadOut:
    row = session.get(CalibrationUpload, upload_id)
    if row is None or row.team != principal.team:
        raise HTTPException(404, f"no calibration upload with id {upload_id}")
    return _out(row)
