"""The anybilld benchmark: ``python -m bench`` (``make bench``); see the README."""
