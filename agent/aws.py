"""A shared aiobotocore client and the mapping of AWS errors to ours.

aiobotocore is botocore on asyncio: no thread per call, the standard
credential chain and retry configuration, and every call bounded by the
connect/read timeouts set here.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from agent.errors import AccessDenied, AgentError, BackendUnavailable, BadRequest, NotFound

_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "InternalServiceError",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "AllAccessDisabled",
    }
)
_MISSING_CODES = frozenset({"ResourceNotFoundException", "NoSuchKey", "NotFound", "404"})


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ("" for other errors)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def map_error(exc: BaseException, *, what: str) -> AgentError:
    """Our error for an AWS failure: transient, denied, missing, or a bad request."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, AgentError):
        return exc
    code = error_code(exc)
    status = 0
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _DENIED_CODES:
        return AccessDenied(f"AWS denied {what} ({code})")
    if code in _MISSING_CODES:
        return NotFound(f"{what}: not found")
    if code in _TRANSIENT_CODES or status >= 500:
        return BackendUnavailable(f"AWS unavailable during {what} ({code or status})")
    if isinstance(exc, (BotoCoreError, asyncio.TimeoutError, OSError)):
        return BackendUnavailable(f"AWS unreachable during {what} ({type(exc).__name__})")
    if isinstance(exc, ClientError):
        return BadRequest(f"AWS refused {what} ({code})")
    return BackendUnavailable(f"AWS call failed during {what} ({type(exc).__name__})")


class AwsClient:
    """One aiobotocore client per store, created on first use and closed by ``aclose``."""

    def __init__(
        self, service: str, *, region: str | None, endpoint_url: str | None, timeout: float
    ) -> None:
        self.service = service
        self.region = region
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        """The client (botocore's dynamic API: typed as Any)."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from aiobotocore.config import AioConfig
                    from aiobotocore.session import get_session

                    config = AioConfig(
                        connect_timeout=self.timeout,
                        read_timeout=self.timeout,
                        retries={"max_attempts": 2, "mode": "standard"},
                    )
                    self._client = await self._stack.enter_async_context(
                        get_session().create_client(
                            self.service,
                            region_name=self.region,
                            endpoint_url=self.endpoint_url,
                            config=config,
                        )
                    )
        return self._client

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()
