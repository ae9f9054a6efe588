"""Online handwriting data: IAM-OnDB and a synthetic generator."""

from handwriting.alphabet import IAM_ONDB_T1, Alphabet
from handwriting.dataset import SequenceSet, featurize, load_examples
from handwriting.features import FeatureConfig, ink_to_features

__all__ = [
  "IAM_ONDB_T1",
  "Alphabet",
  "FeatureConfig",
  "SequenceSet",
  "featurize",
  "ink_to_features",
  "load_examples",
]
