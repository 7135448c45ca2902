"""The public names of DESIGN.md are importable from the top level."""
import numpy as np
import pytest

import efficient_attention as ea

CORES = ["DenseAttention", "SparseAttention", "LocalAttention", "StridedAttention", "GlobalAttention",
         "SinkhornAttention", "LSHAttention", "RoutingAttention", "LinformerAttention", "CompressedAttention", "LinearAttention",
         "EfficientAttention", "BlockSparseAttention"]
LAYERS = ["MultiHeadAttention", "DenseSynthesizer", "RandomSynthesizer", "FactorizedRandomSynthesizer",
          "FourierMixer", "TokenMixingMLP", "SpatialGatingUnit"]
OTHERS = ["Grads", "LayerGrads", "Cost", "EluFeatureMap", "PerformerFeatureMap", "RandomFourierFeatureMap",
          "gradcheck", "patterns", "registry", "kmeans_update", "BlockMask", "attention"]


@pytest.mark.parametrize("name", CORES + LAYERS + OTHERS)
def test_public_name(name):
    assert hasattr(ea, name), name
    assert name in ea.__all__


@pytest.mark.parametrize("name", CORES)
def test_cores_subclass_protocol(name):
    assert issubclass(getattr(ea, name), ea.AttentionCore)


@pytest.mark.parametrize("name", LAYERS)
def test_layers_subclass_protocol(name):
    assert issubclass(getattr(ea, name), ea.SequenceLayer)


def test_lazy_submodules():
    assert callable(ea.testing.qkv) and callable(ea.bench.median_time)
    with pytest.raises(AttributeError):
        ea.no_such_name


def test_patterns_builders():
    for builder in ("local", "strided", "global_tokens", "random", "union", "longformer", "bigbird",
                    "to_ascii", "plot"):
        assert callable(getattr(ea.patterns, builder))
    assert ea.patterns.local(5, 1).dtype == np.bool_
