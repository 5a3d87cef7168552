"""Model families (one file each) and the layers they share; ``registry`` picks the family."""

from tureen.executor.models.registry import model_module, supported_architectures

__all__ = ["model_module", "supported_architectures"]
