"""Data pipeline: image sources, multi-crop augmentation, iBOT masks, collate,
and an infinite sampler / loader whose every random draw is a function of
(seed, global sample position), so training resumes exactly."""

from .augmentations import (
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, CropParams, DataAugmentationDINO, normalize_crops,
)
from .collate import SSLBatch, SSLCollate
from .datasets import ClassFolderDataset, ImageFolderDataset, ManifestDataset, NumpyArrayDataset
from .images import image_extensions, list_image_files, load_image
from .loaders import SSLDataLoader, make_ssl_data_loader
from .masking import MaskingGenerator
from .mnist import MNIST_MEAN, MNIST_STD, MNISTDemoDataset, load_mnist_demo_arrays
from .splits import stratified_split
from .samplers import InfiniteSampler, RankLayout, SampleKey
from dinov2.seeding import derive_seed, numpy_rng, torch_generator
from .ssl_dataset import Sample, SSLDataset
from .unreadable import SkipUnreadable

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ClassFolderDataset",
    "CropParams",
    "DataAugmentationDINO",
    "ImageFolderDataset",
    "InfiniteSampler",
    "MNISTDemoDataset",
    "ManifestDataset",
    "MaskingGenerator",
    "NumpyArrayDataset",
    "RankLayout",
    "SSLBatch",
    "SSLCollate",
    "SSLDataLoader",
    "SSLDataset",
    "Sample",
    "SampleKey",
    "SkipUnreadable",
    "derive_seed",
    "image_extensions",
    "list_image_files",
    "load_image",
    "load_mnist_demo_arrays",
    "make_ssl_data_loader",
    "normalize_crops",
    "numpy_rng",
    "stratified_split",
    "torch_generator",
]
