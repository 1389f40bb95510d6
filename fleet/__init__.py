"""Fleet server: MQTT ingest, drift aggregation, canary rollouts. See issue 4."""

__all__: list[str] = []
