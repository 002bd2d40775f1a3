"""`POST /v1/feedback`: a caller rates an answer they were given; stored, audited and counted."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from headwater.auth import QUERY, caller_from_token, require
from headwater.records import Caller

router = APIRouter()


class FeedbackRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=64,
                            description="The request id of the answer being rated.")
    rating: Literal["up", "down"] = Field(description="up or down (+1 or -1 are accepted).")
    comment: str | None = Field(default=None, max_length=2000)

    @field_validator("rating", mode="before")
    @classmethod
    def _signed(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | str):
            return value  # left for the Literal to refuse
        return {1: "up", -1: "down", "+1": "up", "-1": "down"}.get(value, value)


class FeedbackReceipt(BaseModel):
    feedback_id: int
    request_id: str
    rating: Literal["up", "down"]


def _caller(request: Request) -> Caller:
    return caller_from_token(request.app.state.settings, request.headers.get("authorization"))


def _actor(caller: Caller) -> str:
    # The same actor the audit trail gives the question, so a caller rates only their own.
    return f"user:{caller.user_id}" if caller.user_id else "anonymous"


@router.post("/v1/feedback", status_code=201, response_model=FeedbackReceipt,
             responses={401: {}, 403: {}, 404: {}, 422: {}})
async def feedback(body: FeedbackRequest, request: Request,
                   who: Annotated[Caller, Depends(_caller)]) -> FeedbackReceipt | JSONResponse:
    """Rate an answer you were given, by its request id, with an optional comment."""
    require(who, QUERY)
    services = request.app.state.services
    store, actor = services["store"], _actor(who)
    # Someone else's request id is as unknown as a made-up one: ids are not to be probed.
    if await run_in_threadpool(store.asker, body.request_id) != actor:
        return JSONResponse(status_code=404, content={
            "error": {"code": "not_found",
                      "message": "no answer with this request id was given to you"},
            "request_id": request.state.request_id})
    positive = body.rating == "up"
    feedback_id = await run_in_threadpool(store.record_feedback, body.request_id, actor,
                                          1 if positive else -1, body.comment)
    # The comment stays in the feedback table: the audit trail is exported to a SIEM.
    await run_in_threadpool(services["audit"].append_audit, actor, "query.feedback",
                            body.request_id, body.rating, request.state.request_id,
                            {"feedback_id": feedback_id, "comment": body.comment is not None})
    request.app.state.feedback_metrics.observe(positive)
    return FeedbackReceipt(feedback_id=feedback_id, request_id=body.request_id,
                           rating=body.rating)
