"""anybilld: keeps anybill OAuth tokens fresh for many merchants and publishes them to files."""

__version__ = "0.1.0"
