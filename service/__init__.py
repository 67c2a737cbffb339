"""The online API: FastAPI serving BadNet + GoodNet as an ensemble with micro-batching,
quarantine in Redis (with a local spool when Redis is away), hot-swap of new versions, admin
API and Prometheus metrics. Imports ``nnoculation`` and ``models``; never ``worker``."""
