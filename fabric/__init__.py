"""fabric: a WireGuard-compatible VPN server spread over edge, worker and broker processes."""

__version__ = "0.1.0"
