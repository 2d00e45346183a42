"""Transport settings shared by both ends of the gRPC connection."""

from __future__ import annotations


def grpc_options(max_message_mb: int) -> list[tuple[str, int]]:
    """Channel/server options shared by both ends: message limits and keepalive.

    Keepalive pings every 60 s with pings allowed without active calls, so an idle connection
    (a node training silently for an hour) is neither dropped by middleboxes nor refused by the
    server's ping policy.
    """
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
    ]


INSECURE_WARNING = ("WARNING: --insecure: plaintext gRPC without authentication; anyone on the "
                    "network can read updates and impersonate sites. Local debugging only.")
