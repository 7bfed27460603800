"""Uploads kept in memory, security headers on every response, and the upload form's token.

Why a signed, session-bound token rather than an Origin/Referer check: every page is sent with
``Referrer-Policy: no-referrer``, and under that policy browsers send ``Origin: null`` on our own
form POSTs (Fetch spec, "append a request Origin header") and no Referer at all, so an origin
check would have to accept ``null``, which sandboxed cross-site iframes also send. Instead the
upload page carries a token that is signed with the app's secret key (itsdangerous, a Flask
dependency), expires, and must match a random nonce in the signed ``SameSite=Lax`` session cookie;
a cross-site form can neither read the token nor make the browser send the cookie. This is the
scheme Flask-WTF's CSRFProtect uses, in a few lines. The JSON API is exempt: it reads no cookies
and changes no state, and its responses are not readable cross-origin (no CORS headers).
"""

from __future__ import annotations

import hmac
import io
import secrets
from typing import IO

from flask import Flask
from flask import Request
from flask import Response
from flask import current_app
from flask import request
from flask import session
from itsdangerous import BadData
from itsdangerous import URLSafeTimedSerializer

from .errors import UploadError

__all__ = ["CACHEABLE_ENDPOINTS", "CONTENT_SECURITY_POLICY", "InMemoryRequest", "csrf_token",
           "init_app"]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

# Files any visitor gets alike, which browsers may cache; everything else is no-store.
CACHEABLE_ENDPOINTS = frozenset({"static", "pages.favicon"})

CSRF_FIELD = "csrf_token"
_CSRF_SESSION_KEY = "csrf_nonce"
_CSRF_SALT = "brainmri.upload-form"
_CSRF_EXEMPT_BLUEPRINTS = frozenset({"api"})


class InMemoryRequest(Request):
    """Never spool uploads to a temp file: they may be patient data.

    Werkzeug's default stream factory rolls anything over 500 KB into a temporary file on disk.
    Keeping every part in a BytesIO is safe because MAX_CONTENT_LENGTH bounds the whole body.
    """

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return io.BytesIO()


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key, salt=_CSRF_SALT)


def csrf_token() -> str:
    """A signed token for the upload form, bound to this browser's session (template global)."""
    if _CSRF_SESSION_KEY not in session:
        session[_CSRF_SESSION_KEY] = secrets.token_urlsafe(32)
    return _serializer().dumps(session[_CSRF_SESSION_KEY])


def _check_csrf() -> None:
    """Refuse state-changing page requests whose form token is missing, forged or expired.

    Raises:
        UploadError: code `invalid_form_token`, status 400.
    """
    if request.method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        return
    if not current_app.config["BRAINMRI_CSRF_ENABLED"]:
        return
    if request.blueprint in _CSRF_EXEMPT_BLUEPRINTS or request.endpoint is None:
        return
    expected = session.get(_CSRF_SESSION_KEY)
    token = request.form.get(CSRF_FIELD, "")
    try:
        nonce = _serializer().loads(token, max_age=current_app.config["BRAINMRI_CSRF_TIME_LIMIT"])
    except BadData:
        nonce = None
    if not expected or not isinstance(nonce, str) or not hmac.compare_digest(nonce, expected):
        raise UploadError(
            "invalid_form_token",
            "The upload form has expired or did not come from this site. "
            "Reload the upload page and try again.",
            400,
        )


def _set_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    # Results (and the pages carrying a form token) must not linger in any cache; static files may.
    if request.endpoint not in CACHEABLE_ENDPOINTS:
        response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app: Flask) -> None:
    """Keep uploads in RAM, check the form token, and add the headers to every response."""
    app.request_class = InMemoryRequest
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["csrf_field_name"] = CSRF_FIELD
    app.before_request(_check_csrf)
    app.after_request(_set_security_headers)
