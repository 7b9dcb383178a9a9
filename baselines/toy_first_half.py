
"""A toy baseline for the workflow test: cosine on the first half of the embedding."""
from quari.methods import StaticProjectionMethod


class FirstHalf(StaticProjectionMethod):
    name = "toy_first_half"
    trainable = False

    def embed(self, x):
        return x[..., : x.shape[-1] // 2]
