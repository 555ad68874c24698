"""The pixel normalisation the released DINOv2 backbones were trained with (ImageNet statistics of
RGB in [0, 1]); the default of ``crops.mean/std``, evaluation and curation embedding."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
