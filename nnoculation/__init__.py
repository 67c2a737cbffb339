"""NNoculation: the defense as a library and a CLI (data, noise, attacks, metrics, pre-deployment)."""

__version__ = "0.1.0"
