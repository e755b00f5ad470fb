"""Request and response bodies of the HTTP API: the public contract, and the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", strict=True)


class PostIn(BaseModel):
    """One post. At least one of `text` and `image`."""

    model_config = _STRICT

    id: str | None = Field(None, max_length=200, description="the client's id of the post; "
                           "echoed back, and generated when absent")
    text: str | None = Field(None, description="the post's text; absent or '' for none")
    image: str | None = Field(
        None,
        description="the image file's bytes, base64-encoded (a `data:image/...;base64,` prefix "
        "is accepted). PNG, JPEG, WEBP, BMP or GIF. URLs are never fetched.",
    )


class BatchIn(BaseModel):
    """Several posts in one request (at most `serve.max_posts_per_request`)."""

    model_config = _STRICT

    posts: list[PostIn] = Field(..., min_length=1)


class MultipartPost(BaseModel):
    """`multipart/form-data` upload of one post: the image as a file part."""

    id: str | None = None
    text: str | None = None
    image: bytes | None = Field(None, json_schema_extra={"format": "binary"})


class PostResult(BaseModel):
    id: str
    decision: Literal["allow", "block"]
    score: float = Field(description="the score the decision is based on: the deep model's "
                         "final score (blocked when > the threshold), or the gate's P(ad) when "
                         "stage is gate")
    p_ad: float = Field(description="P(ad) of the stage that decided")
    sensitivity: float | None = Field(description="the deep model's sensitivity in [0, 1]; null "
                                      "when the gate decided")
    stage: Literal["gate", "deep"]
    model_version: str
    latency_ms: float


class ModerateResponse(PostResult):
    """The answer to a single post."""

    request_id: str


class BatchResponse(BaseModel):
    """The answer to a batch: one result per post, in order."""

    request_id: str
    model_version: str
    latency_ms: float
    results: list[PostResult]


class FeedbackIn(BaseModel):
    """A moderator's label for a decided post."""

    model_config = _STRICT

    request_id: str = Field(..., min_length=1, max_length=64)
    post_id: str | None = Field(None, max_length=200, description="needed when the request "
                                "held several posts")
    label: Literal[0, 1] = Field(description="1 = advertising/spam, 0 = clean")
    moderator: str | None = Field(None, max_length=200)
    note: str | None = Field(None, max_length=2000)


class FeedbackOut(BaseModel):
    status: Literal["recorded"]
    request_id: str
    post_id: str


class ReloadIn(BaseModel):
    model_config = _STRICT

    source: str | None = Field(None, description="a bundle folder or models:/name@alias; "
                               "default: the configured source")
    wait: bool = Field(False, description="answer when the load has finished")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str | None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody} for s in statuses}
