"""Fine-tune an ImageNet-pretrained timm CNN on a folder of crop photos with accelerate."""

__version__ = "0.1.0"
