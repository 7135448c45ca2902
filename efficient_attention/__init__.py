"""efficient_attention: the efficient self-attention family in NumPy and Numba,
every variant with a forward pass and a hand-written backward pass.

Shape letters: B batch, H heads, N queries, M keys, D (``d``) query/key width,
Dv value width, K projected length, R hash rounds, C buckets/clusters, F features of
a feature map; BH batch and heads flattened into one axis (in the kernels).

Importing a chapter's module registers its variants (``registry()``).
"""
from .core import (AttentionCore, Cost, Grads, LayerGrads, SequenceLayer, Variant, get_variant,
                   register, registry)
from .gradcheck import gradcheck
from . import config, softmax, validate

__version__ = "0.1.0"

__all__ = [
    "AttentionCore", "SequenceLayer", "Grads", "LayerGrads", "Cost", "Variant",
    "register", "registry", "get_variant", "gradcheck", "config", "softmax", "validate",
]

# chapter 0: full attention
from .dense import DenseAttention, causal_mask  # noqa: E402
__all__ += ["DenseAttention", "causal_mask"]

# chapter 1: hand-designed patterns
from . import patterns  # noqa: E402
from .sparse import GlobalAttention, SparseAttention  # noqa: E402
__all__ += ["patterns", "SparseAttention", "GlobalAttention"]
from .local import LocalAttention, StridedAttention  # noqa: E402
__all__ += ["LocalAttention", "StridedAttention"]
from .blocksparse import BlockMask, BlockSparseAttention, attention  # noqa: E402
__all__ += ["BlockMask", "BlockSparseAttention", "attention"]

# chapter 2: clustered patterns
from .lsh import LSHAttention  # noqa: E402
from .routing import RoutingAttention, kmeans_update  # noqa: E402
__all__ += ["LSHAttention", "RoutingAttention", "kmeans_update"]

# chapter 2: learned patterns
from .sinkhorn import SinkhornAttention  # noqa: E402
__all__ += ["SinkhornAttention"]

# chapter 3: no N x N matrix
from .lowrank import CompressedAttention, LinformerAttention  # noqa: E402
__all__ += ["LinformerAttention", "CompressedAttention"]

# chapter 4: the multiplication order
from .feature_maps import EluFeatureMap, FeatureMap, PerformerFeatureMap, RandomFourierFeatureMap  # noqa: E402
from .linear import EfficientAttention, LinearAttention, LinearState  # noqa: E402
__all__ += ["EluFeatureMap", "FeatureMap", "PerformerFeatureMap", "RandomFourierFeatureMap",
            "EfficientAttention", "LinearAttention", "LinearState"]

# chapters 5-6 and multi-head layers
from .layers import MultiHeadAttention, bigbird_heads, longformer_heads  # noqa: E402
from .synthesizer import DenseSynthesizer, FactorizedRandomSynthesizer, RandomSynthesizer  # noqa: E402
from .mixers import FourierMixer, GatedMLP, SpatialGatingUnit, TokenMixingMLP  # noqa: E402
__all__ += ["MultiHeadAttention", "longformer_heads", "bigbird_heads",
            "DenseSynthesizer", "RandomSynthesizer", "FactorizedRandomSynthesizer",
            "FourierMixer", "TokenMixingMLP", "SpatialGatingUnit", "GatedMLP"]


def __getattr__(name):
    """``ea.testing`` (needs hypothesis) and ``ea.bench`` load on first use."""
    if name in ("testing", "bench"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
