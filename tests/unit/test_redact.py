"""Tokens and secrets never reach the logs."""

import io
import logging

from labfleet_hub.redact import MASK, install, redact


def test_token_fields_are_masked():
    text = "Bad response: {'access_token': 'abc.def', 'refresh_token': \"r3fr\", 'x': 1}"
    out = redact(text)
    assert "abc.def" not in out and "r3fr" not in out and "'x': 1" in out


def test_bearer_jwt_query_and_literal_secret():
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    out = redact(
        f"Authorization: Bearer xyz123 and {jwt} url?access_token=q1&b=2 s3cr3t", ("s3cr3t",)
    )
    assert "xyz123" not in out and jwt not in out and "q1" not in out and "s3cr3t" not in out
    assert out.count(MASK) == 4 and "b=2" in out


def test_filter_on_logger_and_exceptions():
    logger = logging.getLogger("labfleet.test.redact")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    install(logger, ("client-secret-value",))
    logger.warning("token response %s", {"access_token": "tok-123"})
    try:
        raise ValueError("refresh_token=zzz client-secret-value")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert "tok-123" not in text and "zzz" not in text and "client-secret-value" not in text
    assert "failed" in text and "ValueError" in text
    # installing twice keeps one filter
    install(logger)
    assert len(logger.filters) == 1
