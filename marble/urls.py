"""Credentials in URLs: find them (config validation refuses them) and hide them (before logging).

A URL in the config travels far: `params.yaml`, the compiled pipeline YAML, every task's arguments,
`registration.json`, registry metadata and logs. A password in its user-info (`https://user:pw@host`)
or a token in its query (`?token=...`, a presigned `X-Amz-Signature=...`) would leak through all of
them, so marble refuses such URLs and takes credentials from environment variables that the pipeline
fills from Kubernetes secrets (docs/security.md).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

REDACTED = "***"

_SECRET_WORDS = re.compile(r"token|secret|passw|apikey|signature|credential|session", re.I)
"""Query keys containing one of these (anywhere: `access_token`, `X-Amz-Signature`) hold a secret."""
_SECRET_PARTS = frozenset({"key", "sig", "pwd", "pass", "auth", "authorization", "code"})
"""Query keys with one of these parts (`api_key`, Azure SAS `sig`, OAuth `code`) hold a secret."""
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def is_secret_key(key: str) -> bool:
    """Whether a query parameter named `key` looks like it carries a credential."""
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", key.lower()) if p]
    return bool(_SECRET_WORDS.search(key)) or any(p in _SECRET_PARTS for p in parts)


def url_credentials(url: str) -> list[str]:
    """What in `url` looks like a credential: 'user-info' and/or 'query parameter <key>' entries."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ["an unparseable address"]
    found = []
    if "@" in parts.netloc:
        found.append("user-info")
    found += [
        f"query parameter {k!r}"
        for k, _ in parse_qsl(parts.query, keep_blank_values=True)
        if is_secret_key(k)
    ]
    return found


def redact_url(url: str) -> str:
    """`url` with the user-info and every credential-like query value replaced by `***`."""
    if not url_credentials(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(
        f"{k}={REDACTED if is_secret_key(k) else v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (for exception messages that quote a URL)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def refuse_credentials(url: str, instead: str) -> str:
    """`url` if it carries no credential, else a ValueError (for a config validator) saying where
    credentials go instead; the message never quotes the URL (the validator's caller shows it redacted)."""
    found = url_credentials(url)
    if found:
        raise ValueError(
            f"the URL carries credentials ({', '.join(found)}), which would be written to params.yaml, the "
            f"compiled pipeline, registry metadata and logs; {instead}"
        )
    return url
