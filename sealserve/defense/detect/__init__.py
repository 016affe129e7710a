"""Extraction detectors: PRADA, distribution/coverage, volume; state in a BlobStore."""

from sealserve.defense.detect.base import Detector, DetectorScore, DetectorSuite, SuiteResult
from sealserve.defense.detect.distribution import DistributionConfig, DistributionDetector
from sealserve.defense.detect.prada import PradaConfig, PradaDetector
from sealserve.defense.detect.state import BlobStore, MemoryBlobStore
from sealserve.defense.detect.volume import VolumeConfig, VolumeDetector

__all__ = [
    "BlobStore",
    "Detector",
    "DetectorScore",
    "DetectorSuite",
    "DistributionConfig",
    "DistributionDetector",
    "MemoryBlobStore",
    "PradaConfig",
    "PradaDetector",
    "SuiteResult",
    "VolumeConfig",
    "VolumeDetector",
]
