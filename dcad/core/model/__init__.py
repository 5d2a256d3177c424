"""The DRDC model: frozen backbone, transformer base branch, diffusion refiner, fusion.

Submodules are imported directly (`from dcad.core.model.backbone import FeatureExtractor`), so that
importing one part does not pull in the others.
"""
