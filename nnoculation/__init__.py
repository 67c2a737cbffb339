"""NNoculation: the defense as a library and a CLI."""

__version__ = "0.1.0"
