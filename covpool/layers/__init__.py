"""``nn.Module`` meta-layers built on :mod:`covpool.linalg`."""
__all__: list[str] = []
