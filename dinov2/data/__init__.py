"""Data pipeline: image sources, multi-crop augmentation, iBOT masks, collate,
and an infinite sampler / loader whose every random draw is a function of
(seed, global sample position), so training resumes exactly."""

from .augmentations import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, CropParams, DataAugmentationDINO
from .collate import collate_data_and_cast
from .datasets import ImageFolderDataset, ManifestDataset, NumpyArrayDataset, image_extensions, load_image
from .loaders import SSLCollate, SSLDataLoader, make_ssl_data_loader
from .masking import MaskingGenerator
from .mnist import MNIST_MEAN, MNIST_STD, MNISTDemoDataset, load_mnist_demo_arrays
from .splits import stratified_split
from .samplers import InfiniteSampler
from .seeding import derive_seed, numpy_rng, torch_generator
from .ssl_dataset import SSLDataset
from .unreadable import SkipUnreadable

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "CropParams",
    "DataAugmentationDINO",
    "ImageFolderDataset",
    "InfiniteSampler",
    "MNISTDemoDataset",
    "ManifestDataset",
    "MaskingGenerator",
    "NumpyArrayDataset",
    "SSLCollate",
    "SSLDataLoader",
    "SSLDataset",
    "SkipUnreadable",
    "collate_data_and_cast",
    "derive_seed",
    "image_extensions",
    "load_image",
    "load_mnist_demo_arrays",
    "make_ssl_data_loader",
    "numpy_rng",
    "stratified_split",
    "torch_generator",
]
