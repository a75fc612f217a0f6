"""gRPC settings both ends of the head-worker link must agree on."""

# Steps carry whole prompts; a large batch of long ones exceeds gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 1 << 30
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # The head pings an idle stream so a vanished worker is noticed; allow it.
    # (The key gRPC core reads; a "min_recv_ping_interval..." spelling is silently ignored.)
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

# The head's side: its channels to the workers.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Ping the connection so a worker whose node vanished (or whose process froze) is
    # noticed. Measured with grpcio 1.85 against a SIGSTOPed worker: keepalive_timeout_ms
    # alone does not bound it; the unanswered ping is dropped after ping_timeout_ms
    # (default 60 s: 60 s with a busy stream, 69 s idle). With it set, 5 s busy, 14 s idle.
    # max_pings_without_data 0: keep pinging while the head has nothing to send.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
