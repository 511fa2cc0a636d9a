"""WireGuard (whitepaper section numbers in comments): messages, Noise, cookies, the guard, the sans-I/O endpoint."""
