"""Local features (pipeline stage 1): image loading, extractors, whitening, feature store.

The extractor interface, shared by SIFT and the deep extractors, is described in
:mod:`asmkit.features.extract`.
"""

from .extract import ExtractionResult, Extractor, ImageFeatures, extract_features, image_names
from .factory import FEATURE_TYPES, Features, build_extractor, deep_extractor
from .io import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, MIN_SIDE, ImageLoadError, list_images, load_image
from .sift import SiftExtractor, root_sift
from .store import FeatureStore
from .whitening import PCAWhitening

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ExtractionResult",
    "Extractor",
    "FEATURE_TYPES",
    "Features",
    "FeatureStore",
    "IMAGE_EXTENSIONS",
    "ImageFeatures",
    "ImageLoadError",
    "MIN_SIDE",
    "PCAWhitening",
    "SiftExtractor",
    "build_extractor",
    "deep_extractor",
    "extract_features",
    "image_names",
    "list_images",
    "load_image",
    "root_sift",
]
