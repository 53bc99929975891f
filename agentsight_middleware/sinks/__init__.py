"""Where events go: the AgentSight API (``http``), waiting in an ``outbox`` on the way."""
