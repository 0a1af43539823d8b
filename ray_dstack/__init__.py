"""ray-dstack: run dstack `service` configurations on Ray Serve."""

__version__ = "0.1.0"
