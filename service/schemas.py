"""Response bodies of the API: what the OpenAPI schema promises (and schemathesis checks)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    detail: str | list[dict[str, Any]] = Field(
        description="what was wrong, for a person (a list for invalid parameters, as FastAPI "
        "reports them)"
    )


class PredictionOut(BaseModel):
    label: int = Field(description="the ensemble's answer: the GoodNet's label (sec. 3.3)")
    class_name: str
    model_version: str = Field(description="store version that answered")
    request_id: str
    quarantined: bool | None = Field(
        None,
        description="whether BadNet and GoodNet disagreed and the input was quarantined; "
        "only for admin callers, or for everyone with NNOC_EXPOSE_QUARANTINE",
    )


class BatchItemOut(BaseModel):
    index: int = Field(description="position of the file in the request")
    filename: str | None = None
    status: int = Field(description="HTTP status this item would have had on /predict")
    prediction: PredictionOut | None = None
    error: str | None = None


class BatchOut(BaseModel):
    request_id: str
    results: list[BatchItemOut]


class HealthOut(BaseModel):
    status: str
    version: str | None = None
    pid: int


class RepairStarted(BaseModel):
    repair_id: str | None = Field(description="the repair started, or the one in flight")
    started: bool = Field(description="false (409): a repair is in flight, or nothing is pending")
    detail: str | None = None


class Detail(BaseModel):
    """A free-form JSON object (status, stats, reports)."""

    model_config = {"extra": "allow"}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error codes answered with :class:`ErrorOut`."""
    return {code: {"model": ErrorOut} for code in codes}
