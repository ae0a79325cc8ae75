"""Credentials out of anything pomona prints, logs or tracks: URLs lose their user:password and secret query values.

Tracking URIs (`postgresql://user:password@host/db`) and endpoint base URLs (`https://user:key@host/v1?api_key=...`)
may carry secrets; MLflow params, config.yaml, Prefect artifacts and error messages must show only where, not how.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters whose value is a secret (api_key, access_token, X-Amz-Signature, sig, password, ...);
# `api-version`, `model` and the like stay readable.
_SECRET_QUERY = re.compile(r"key|token|secret|passw|pwd|sig|auth|credential|session", re.IGNORECASE)
# scheme://[userinfo@]host...: what a string must look like to be treated as a URL (never a plain path or text).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://\S+$")


def redact_url(value: str) -> str:
    """`value` with a URL's user:password replaced by *** and secret query values by ***; anything that is not a
    URL comes back unchanged."""
    if not isinstance(value, str) or not _URL.match(value):
        return value
    try:
        parts = urlsplit(value)
        netloc = parts.netloc
    except ValueError:  # an unparsable URL (bad port, brackets): hide everything after the scheme
        return value.split("://", 1)[0] + "://" + MASK
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return value
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def strip_userinfo(value: str) -> str:
    """A URL without its user:password part at all (for links a browser opens)."""
    parts = urlsplit(value)
    if "@" not in parts.netloc:
        return value
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, parts.fragment))


def redact_values(obj):
    """A JSON-like structure (dicts, lists, strings) with every URL string redacted."""
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_values(v) for v in obj]
    return redact_url(obj) if isinstance(obj, str) else obj
