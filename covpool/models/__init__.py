"""Backbones registered in timm's model registry (the only place covpool imports timm)."""
__all__: list[str] = []
