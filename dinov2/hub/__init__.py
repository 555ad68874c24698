from .backbones import BACKBONES, load_backbone, load_described
from .description import BackboneDescription
from .weights import ClassifierWeights, Weights

__all__ = ["BACKBONES", "BackboneDescription", "ClassifierWeights", "Weights", "load_backbone", "load_described"]
