"""Cosine similarity on the frozen backbone embedding: the "backbone" rows of the tables."""

from quari.methods import StaticProjectionMethod


class Identity(StaticProjectionMethod):
    """No adaptation: rank the gallery by cosine similarity to the query embedding."""

    name = "identity"
    label = "backbone"
    trainable = False
    is_backbone = True
    #: nothing is learned, so no training collection is embedded for it
    uses_training_data = False

    def __init__(self, device: str | None = None):
        # no settings: an explicit signature so that a typo in its config entry is refused
        super().__init__(device=device)
