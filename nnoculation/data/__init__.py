"""Data sources (Fashion-MNIST IDX, scikit-learn digits, image folders, .npz) and splits."""

from nnoculation.data.imageset import ImageSet

__all__ = ["ImageSet"]
