"""The control plane: ZeroMQ framing between edges and workers, the broker's Clone-pattern state (kvmsg, clone), requests, CURVE, one-wait polling."""
