"""A minimal HTTP/1.1 GET over h11, as the kubelet and Prometheus make them."""

from __future__ import annotations

import h11
import trio
from prometheus_client.parser import text_string_to_metric_families


async def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    """``(status, body)`` of one request to the server on 127.0.0.1:``port``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method=method, target=path, headers=[("host", "probe")])
        await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body)
            else:
                raise AssertionError(f"unexpected {event!r}")


def sample(exposition: bytes, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(exposition.decode()):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0
