"""SSL-MedSAM2: semi-supervised 3D segmentation with training-free few-shot SAM2 and iterative nnU-Net."""
__version__ = "0.1.0"
