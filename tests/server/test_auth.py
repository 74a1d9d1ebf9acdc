"""``--api-keys``: the bearer key is compared with every configured key in constant time (no early exit,
``hmac.compare_digest``), and the near misses an attacker would time are refused alike."""

import hmac

import pytest
from starlette.requests import Request

from server.auth import authorize
from server.errors import APIError


def _request(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode("latin-1"))]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers})


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("server.auth.hmac.compare_digest", spy)
    authorize(_request("Bearer k1"), ["k1", "k2", "k3"])  # the first key matches: the others are compared all the same
    assert [b for _, b in calls] == [b"k1", b"k2", b"k3"]


@pytest.mark.parametrize("header", [None, "", "Bearer ", "Bearer sekre", "Bearer sekret2", "bearer sekret",
                                    "Basic sekret", "Bearer  sekret", "Bearer sekr\xe9t"])
def test_near_misses_are_refused(header):
    with pytest.raises(APIError) as e:
        authorize(_request(header), ["sekret", "other"])
    assert e.value.status == 401


def test_no_keys_means_open():
    authorize(_request(None), [])
