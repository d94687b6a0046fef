"""Too busy on the client side: the servers' refusals become TooBusy with the server's hint,
and idempotent calls wait at least that long before retrying."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from propserve.clients import ResourceExhausted, RetryPolicy, TooBusy, grpc_client, rest_client


def test_a_too_busy_answer_carries_the_hint_in_milliseconds_and_the_request_id() -> None:
    body = b'{"error": {"code": "too_busy", "message": "try again later"}}'
    headers = {"retry-after": "1", "retry-after-ms": "100", "x-request-id": "r-1"}
    error = rest_client.translate(httpx.Response(429, content=body, headers=headers))
    assert isinstance(error, TooBusy) and isinstance(error, ResourceExhausted)
    assert error.retry_after == 0.1
    assert error.message == "try again later"
    assert error.status == 429
    assert error.request_id == "r-1"


def test_a_429_from_elsewhere_is_too_busy_with_its_retry_after() -> None:
    response = httpx.Response(429, content=b"slow down", headers={"retry-after": "2"})
    error = rest_client.translate(response)
    assert isinstance(error, TooBusy)
    assert error.retry_after == 2.0
    assert error.request_id is None


@pytest.mark.parametrize("header", [None, "soon", "Wed, 21 Oct 2026 07:28:00 GMT"])
def test_a_429_without_a_usable_hint_is_still_too_busy(header: str | None) -> None:
    headers = {"retry-after": header} if header else {}
    error = rest_client.translate(httpx.Response(429, content=b"busy", headers=headers))
    assert isinstance(error, TooBusy)
    assert error.retry_after is None


def test_a_413_is_too_large_not_too_busy() -> None:
    body = b'{"error": {"code": "resource_exhausted", "message": "body too large"}}'
    error = rest_client.translate(httpx.Response(413, content=body))
    assert isinstance(error, ResourceExhausted) and not isinstance(error, TooBusy)


class FakeRpcError(grpc.RpcError, grpc.Call):
    """A failed call as grpc raises it, with trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def test_the_error_code_trailer_says_too_busy() -> None:
    trailers = (("error-code", "too_busy"), ("x-request-id", "abc"), ("retry-after-ms", "250"))
    error = grpc_client.translate(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "try again later", trailers)
    )
    assert isinstance(error, TooBusy)
    assert error.retry_after == 0.25
    assert error.status == "RESOURCE_EXHAUSTED"
    assert error.request_id == "abc"


def test_resource_exhausted_with_only_a_retry_hint_is_too_busy() -> None:
    trailers = (("retry-after-ms", "250"),)
    error = grpc_client.translate(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "try again later", trailers)
    )
    assert isinstance(error, TooBusy)
    assert error.retry_after == 0.25


def test_resource_exhausted_without_a_hint_is_too_large() -> None:
    error = grpc_client.translate(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large", ())
    )
    assert isinstance(error, ResourceExhausted) and not isinstance(error, TooBusy)


def test_the_retry_waits_at_least_the_servers_hint_within_max_delay() -> None:
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.5)
    assert 0.3 <= policy.delay(0, TooBusy("busy", retry_after=0.3)) <= 0.5
    assert policy.delay(0, TooBusy("busy", retry_after=30)) == 0.5
    assert policy.delay(0, TooBusy("busy")) <= 0.015


def test_too_busy_is_retried_and_too_large_is_not() -> None:
    calls: list[int] = []
    policy = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)

    def busy_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TooBusy("busy", retry_after=0.001)
        return "done"

    assert policy.call(busy_twice) == "done"
    assert len(calls) == 3

    def too_large() -> str:
        calls.append(1)
        raise ResourceExhausted("too large")

    calls.clear()
    with pytest.raises(ResourceExhausted):
        policy.call(too_large)
    assert len(calls) == 1
