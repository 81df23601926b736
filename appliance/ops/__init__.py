"""Operations: status, metrics, status page, heartbeat, systemd integration.

Owns: turning the store's state into things people and machines read. May not change state
except through the store's functions (a retry button calls ``jobs.retry``).
"""
