"""The webhook block convflow's alerts go through: Prefect's ``CustomWebhookNotificationBlock``
with the webhook's answer bounded.

The Prefect server sends the notification, so a broken or hostile webhook answers the
server. Prefect's own block reads the whole response body; this one reads at most
``RESPONSE_CAP`` bytes of it (raw, never decompressed) and closes the connection, and the
whole exchange (connect, send, answer) ends within the block's ``timeout`` seconds. A
non-2xx answer fails the notification with one line (status and the answer's first words).

The server finds this class through the ``prefect.collections`` entry point in
pyproject.toml: Prefect imports those modules before it looks a block type up, in any server
started where convflow is installed. Kept import-light (no torch): every Prefect process in
that environment imports it.
"""

from __future__ import annotations

# async_dispatch: what Prefect's own blocks use so the server can ``await block.notify(...)``
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.blocks.abstract import NotificationError
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.utilities.asyncutils import run_coro_as_sync

#: Most bytes of a webhook's answer read; the rest is never read (the connection is closed).
RESPONSE_CAP = 64 * 1024
#: Most characters of the answer shown in the error for a non-2xx status.
_SHOWN = 200


class WebhookFailed(NotificationError):
    """A notification the webhook did not take: ``log`` (and ``str``) is one line."""

    def __init__(self, log: str) -> None:
        super().__init__(log)
        Exception.__init__(self, log)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class ConvflowWebhook(CustomWebhookNotificationBlock):
    """A custom webhook whose answer is read at most ``RESPONSE_CAP`` bytes far, within
    ``timeout`` seconds in all."""

    _block_type_name = "Convflow Webhook"
    _block_type_slug = "convflow-webhook"
    _description = ("A custom webhook (convflow alerts) reading at most 64 KiB of the answer, "
                    "within the timeout in all.")

    async def anotify(self, body: str, subject: str | None = None) -> None:
        import anyio
        import httpx
        from prefect.utilities.urls import SSRFProtectedAsyncHTTPTransport, validate_restricted_url

        request = self._build_request_args(body, subject)
        client = {"headers": {"user-agent": "convflow alerts"},
                  "cookies": request.pop("cookies", None) or {}}
        head = bytearray()
        try:
            if not self.allow_private_urls:
                validate_restricted_url(request["url"])
                client["transport"] = SSRFProtectedAsyncHTTPTransport()
            with anyio.fail_after(self.timeout):
                async with httpx.AsyncClient(**client) as http, \
                        http.stream(**request) as response:
                    async for chunk in response.aiter_raw():
                        head += chunk
                        if len(head) >= RESPONSE_CAP:
                            break  # leaving the block closes the connection unread
        except TimeoutError:
            raise WebhookFailed(f"the webhook took over {self.timeout:g} s in all") from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # ValueError: restricted
            raise WebhookFailed(f"the webhook failed: {type(exc).__name__}: "
                                f"{_one_line(str(exc))}") from None
        if not 200 <= response.status_code < 300:
            text = bytes(head[:_SHOWN * 4]).decode("utf-8", "replace")
            raise WebhookFailed(f"the webhook answered HTTP {response.status_code}: "
                                f"{_one_line(text)}")

    @async_dispatch(anotify)
    def notify(self, body: str, subject: str | None = None) -> None:
        run_coro_as_sync(self.anotify(body, subject))
