"""What the online service and the repair worker share: Redis key names, the quarantine, repair
records and their reconciliation, activation announcements, process heartbeats and the settings
both read. ``service`` and ``worker`` never import each other; they meet here, in Redis and in
the model store."""
