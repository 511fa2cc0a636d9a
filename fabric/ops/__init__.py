"""Operator commands and what they share: config, paths, preflight, admin client, status rendering, metrics, logs, `fabric up`."""
