"""The one exception tree of skinlab.

Every error carries the HTTP ``status``, the service's ``code`` (``error_code`` for HTTP
errors, the engine code such as ``error_no_face`` for failed tasks), the ``message`` and the
``request_id`` (the ``x-request-id`` response header), when known. ``retry_safe`` says whether
doing the same call again is safe: it never is for a task creation whose fate is unknown.

API keys never appear in messages: :func:`redact` strips anything that looks like the key.
"""

from __future__ import annotations

import re

__all__ = [
    "SkinlabError",
    "ConfigurationError",
    "InsecureTransportError",
    "ImageError",
    "InvalidParametersError",
    "MixedBackendsError",
    "APIError",
    "AuthenticationError",
    "RateLimitError",
    "InsufficientCreditsError",
    "InvalidTaskIdError",
    "ServerError",
    "TransportError",
    "SkinlabConnectionError",
    "UploadError",
    "ResultFormatError",
    "TaskError",
    "NoFaceError",
    "FaceTooSmallError",
    "FaceOutOfBoundError",
    "LightingDarkError",
    "ImageTooSmallError",
    "ImageTooLargeError",
    "FileTooLargeError",
    "DownloadImageError",
    "DecodeImageError",
    "FaceParsingError",
    "MultiplePeopleError",
    "FaceAngleError",
    "InternalEngineError",
    "TaskTimeoutError",
    "TaskFateUnknownError",
    "WebhookSignatureError",
    "redact",
    "task_error_for",
]

_SECRETS: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Remember a secret (an API key) so that :func:`redact` removes it from any text."""
    if secret and len(secret) >= 4:
        _SECRETS.add(secret)


_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def redact(text: str) -> str:
    """Return ``text`` with every registered secret and any bearer token replaced by ``***``."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _BEARER.sub(r"\1***", text)


class SkinlabError(Exception):
    """Base class of every skinlab error.

    Attributes
    ----------
    message : str
        What went wrong and what to do next.
    status : int or None
        HTTP status of the response, if one was received.
    code : str or None
        The service's ``error_code`` or engine error code.
    request_id : str or None
        The ``x-request-id`` header of the response.
    retry_safe : bool
        True when repeating the same call cannot bill twice and may succeed.
    """

    retry_safe = False

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 request_id: str | None = None) -> None:
        self.message = redact(str(message))
        self.status = status
        self.code = code
        self.request_id = request_id
        super().__init__(self.message)

    def __str__(self) -> str:
        parts = [self.message]
        extra = []
        if self.status is not None:
            extra.append(f"HTTP {self.status}")
        if self.code:
            extra.append(f"code {self.code}")
        if self.request_id:
            extra.append(f"request id {self.request_id}")
        if extra:
            parts.append(f"[{', '.join(extra)}]")
        return " ".join(parts)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(message={self.message!r}, status={self.status!r}, "
                f"code={self.code!r}, request_id={self.request_id!r})")


class ConfigurationError(SkinlabError):
    """skinlab is not set up for the call (no API key, bad base URL, missing extra)."""


class InsecureTransportError(ConfigurationError):
    """A URL would carry data unencrypted (plain http to a non-loopback host, or not http at all).

    Raised before the request is sent. Pass ``allow_insecure_http=True`` to the client only if
    you really mean it.
    """


class InvalidParametersError(SkinlabError, ValueError):
    """The request's parameters are wrong (locally, or HTTP 400 ``InvalidParameters``/``BadRequest``)."""


class ImageError(InvalidParametersError):
    """The image cannot be sent as it is (format, size, mode); raised before any upload."""


class MixedBackendsError(SkinlabError, ValueError):
    """Local-engine and cloud scores were about to be pooled in one table or series.

    They are different instruments. Select one with ``backend="local"`` / ``backend="cloud"``,
    or pass ``allow_mixed=True`` to keep both (the ``backend`` column tells them apart).
    """


class APIError(SkinlabError):
    """The service answered with an HTTP error."""


class AuthenticationError(APIError):
    """HTTP 401: the API key is missing, malformed, unknown, inactive or expired."""


class RateLimitError(APIError):
    """HTTP 429: too many requests (250 per 300 s per key and per address)."""

    retry_safe = True


class InsufficientCreditsError(APIError):
    """HTTP 400 ``CreditInsufficiency``: the unit balance is below the task's cost."""


class InvalidTaskIdError(APIError):
    """The task id is unknown, expired (24 h after completion), deleted or someone else's."""


class ServerError(APIError):
    """HTTP 5xx from the service."""

    retry_safe = True


class TransportError(SkinlabError):
    """The connection failed or the answer could not be read."""

    retry_safe = True


class SkinlabConnectionError(TransportError):
    """No connection could be made, or it dropped."""


class UploadError(TransportError):
    """The presigned PUT of the image failed; no task was created."""


class ResultFormatError(SkinlabError):
    """A result (JSON or ZIP) is malformed or unsafe."""


class TaskFateUnknownError(SkinlabError):
    """A create call failed after it may have reached the service.

    The task may exist and may be billed if it succeeds. skinlab never re-sends it; check the
    ledger or the console before submitting again.
    """

    retry_safe = False


class TaskTimeoutError(SkinlabError):
    """The caller's deadline passed while the task was still running.

    The task id is kept in :attr:`task_id`: resume with ``client.task(task_id).wait()``; do
    not submit again (that would bill twice).
    """

    def __init__(self, message: str, *, task_id: str | None = None, **kw) -> None:
        self.task_id = task_id
        super().__init__(message, **kw)


class WebhookSignatureError(SkinlabError):
    """A received webhook failed verification (contract §8.7): do not act on it.

    Raised by :func:`skinlab.webhooks.verify` when the ``webhook-*`` headers are missing or
    malformed, no signature matches the body (tampered, or signed with another secret), or the
    timestamp is outside the tolerance (a replay, or a clock off by minutes). :attr:`code` says
    which: ``missing_headers``, ``bad_timestamp``, ``bad_signature`` or ``stale_timestamp``.
    Answer the sender with a 4xx and drop the message.
    """


class TaskError(SkinlabError):
    """The task ended in ``error``. :attr:`code` holds the engine's code, even an unknown one."""

    hint = ""

    def __init__(self, message: str, *, task_id: str | None = None, **kw) -> None:
        self.task_id = task_id
        if self.hint and self.hint not in message:
            message = f"{message}. {self.hint}"
        super().__init__(message, **kw)


class NoFaceError(TaskError):
    hint = ("Use a frontal photo with one clearly visible face; a photo turned sideways or upside down (its EXIF "
            "orientation lost) may show none: rotate it upright first.")


class FaceTooSmallError(TaskError):
    hint = ("Crop the photo so the face fills 60-80% of the image width (raising the resolution does not help); "
            "a photo turned sideways shows the face narrow: rotate it upright first.")


class FaceOutOfBoundError(TaskError):
    hint = "Keep the whole face, forehead to chin, inside the frame."


class LightingDarkError(TaskError):
    hint = "Retake the photo in even, brighter light."


class ImageTooSmallError(TaskError):
    hint = "The short side must be at least 480 px (SD) or 1080 px (HD)."


class ImageTooLargeError(TaskError):
    hint = "Downscale the image (the long side need not exceed 2560 px)."


class FileTooLargeError(TaskError):
    hint = "Files must be at most 10 MB; re-encode as JPEG at quality 90."


class DownloadImageError(TaskError):
    hint = "The service could not fetch the image URL; check it is public and returns a JPEG or PNG."


class DecodeImageError(TaskError):
    hint = "The file is not a decodable JPEG or PNG."


class FaceParsingError(TaskError):
    hint = "The face could not be segmented; try a clearer, frontal photo."


class MultiplePeopleError(TaskError):
    hint = "Use a photo with exactly one face."


class FaceAngleError(TaskError):
    hint = ("Face the camera straight on, head level. If the person is level, the photo itself is turned "
            "(sideways or upside down, e.g. its EXIF orientation was lost): rotate it upright first.")


class InternalEngineError(TaskError):
    hint = "If the image was uploaded with upload(), check that the upload succeeded; otherwise retry later."


_TASK_ERRORS: dict[str, type[TaskError]] = {
    "error_no_face": NoFaceError,
    "error_src_face_too_small": FaceTooSmallError,
    "error_src_face_out_of_bound": FaceOutOfBoundError,
    "error_lighting_dark": LightingDarkError,
    "error_below_min_image_size": ImageTooSmallError,
    "error_exceed_max_image_size": ImageTooLargeError,
    "exceed_max_filesize": FileTooLargeError,
    "error_download_image": DownloadImageError,
    "error_decode_image": DecodeImageError,
    "error_face_parsing": FaceParsingError,
    "error_multiple_people": MultiplePeopleError,
    "error_large_face_angle": FaceAngleError,
    "error_face_angle_downward": FaceAngleError,
    "unknown_internal_error": InternalEngineError,
}


def task_error_for(code: str | None, message: str | None = None, *, task_id: str | None = None,
                   request_id: str | None = None) -> TaskError:
    """Build the :class:`TaskError` subclass for an engine error ``code`` (an open set)."""
    cls = _TASK_ERRORS.get(code or "", TaskError)
    text = message or f"The task failed with {code or 'an unknown error'}"
    return cls(text, code=code, task_id=task_id, request_id=request_id, status=200)
