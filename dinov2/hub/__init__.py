from .backbones import BACKBONES, load_backbone
from .weights import ClassifierWeights, Weights

__all__ = ["BACKBONES", "ClassifierWeights", "Weights", "load_backbone"]
