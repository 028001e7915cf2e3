"""The peers: ``peer send`` and ``peer recv``."""
