"""The reference's deletion noise: sentence-transformers' DenoisingAutoEncoderDataset.delete (nltk words,
each deleted with probability del_ratio, at least one kept, Treebank detokenize), with an explicit
generator instead of numpy's global state.

NLTK's punkt data cannot be downloaded here, so words come from TreebankWordTokenizer (what
word_tokenize runs after punkt's sentence split; the same words for one-sentence inputs)."""

from __future__ import annotations

import numpy as np
from nltk.tokenize import TreebankWordTokenizer
from nltk.tokenize.treebank import TreebankWordDetokenizer


def reference_noise():
    """(delete, detokenize): ``delete(text, rng, detokenize, del_ratio=0.6)`` is the reference's noise."""
    tokenize, detokenizer = TreebankWordTokenizer().tokenize, TreebankWordDetokenizer()

    def delete(text, rng, detokenize, del_ratio=0.6):
        words = tokenize(text)
        n = len(words)
        if n == 0:
            return text
        keep = rng.random(n) > del_ratio
        if keep.sum() == 0:
            keep[rng.choice(n)] = True
        return detokenize(np.array(words)[keep])

    return delete, detokenizer.detokenize
