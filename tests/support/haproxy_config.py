"""The `global` and `defaults` sections of a configuration shaped like the one Ray Serve generates for HAProxy
(stats socket at `{socket}`, a format field), for tests that run Ray's haproxy outside Ray."""

SERVE_PREAMBLE = """\
global
    stats socket {socket} mode 666 level admin expose-fd listeners
    stats timeout 30s
defaults
    mode http
    option httplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option redispatch 1
    retry-on conn-failure
"""


def answer_json(handler, status: int, payload: dict) -> None:
    """A test server's JSON answer (`http.server` handler) with its Content-Length."""
    import json

    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
