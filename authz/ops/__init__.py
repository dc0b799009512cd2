"""Running the service: metrics, logs, health endpoints and the multi-process supervisor."""
