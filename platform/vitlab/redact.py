"""Credentials written into URIs (``scheme://user:password@host``, ``?token=...``, presigned ``X-Amz-Signature``)
are replaced by ``***`` in everything vitlab records or shows: MLflow params, tags and artifacts, job metadata,
manifests, best.yaml, log lines. The values themselves are used as given; only their records are redacted."""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]+@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&;\s#]*(?:token|key|secret|passw|pwd|signature|sig|credential|auth|session)[^=&;\s#]*)="
    r"[^&;\s#]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}={MASK}", text)


def redact_all(value: Any) -> Any:
    """Every string in nested dicts, lists and tuples redacted (a manifest, a config's dict)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(v) for v in value)
    return value


class RedactFilter(logging.Filter):
    """Installed on the CLI's log handlers: no log line shows a URI's credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
