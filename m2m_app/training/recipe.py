"""The training recipe: the settings the shipped weights were trained with.

:class:`TrainingRecipe`'s defaults are the shipped weights' recipe, so that training on a
new dataset without options (``m2m-train phase1/phase2`` or
:func:`m2m_app.training.loop.train_phase`) follows the recipe the model card measured; it
is stored as-is in the exported weights' JSON (``recipe``). ``scripts/train_shipped_weights.sh``
still spells every setting out, so that it reproduces the shipped weights whatever these
defaults become; a test checks that these values are the ones recorded in the shipped weights' JSON.

This module imports nothing heavy (the CLI reads it to build ``--help``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from m2m_app.errors import UsageError

#: T1w detail transfer (``m2m-train fit-detail``): Gaussian sigma (mm) of the low-pass removed
#: from the intensity-looked-up FA, and the weight of the high-pass added to the predicted FA;
#: chosen on the leave-one-person-out folds (``benchmarks/ablate_fa_detail.py``).
FA_DETAIL_SIGMA_MM = 6.0
FA_DETAIL_WEIGHT = 0.5
#: Adam learning rate of a fine-tuning run (``--init-weights``): a quarter of the recipe's, so that
#: the first steps (random discriminators, a new dataset's first batches) do not throw away what
#: the initial weights learnt. Every other setting stays the recipe's.
FINE_TUNE_LR = 5e-5


@dataclass(frozen=True)
class TrainingRecipe:
    """What decides a translator's training, besides its data."""

    #: Total epochs; a resumed run continues up to this number. (The shipped weights saw about
    #: 3 400 steps per phase: phase 1 ran 24 epochs of 5 sessions.)
    epochs: int = 30
    #: Slices per optimisation step (per process under DDP).
    batch_size: int = 8
    #: Adam learning rate of the generator and of the discriminators.
    lr: float = 2e-4
    #: Seeds initialisation, shuffling and augmentation.
    seed: int = 0
    #: Channels of the translator's first encoder level (doubled per level).
    base: int = 16
    #: Poolings of the translator's encoder.
    depth: int = 4
    #: Channels of the first level of both discriminators (not exported).
    disc_base: int = 32
    #: Weight of each discriminator's LSGAN term in the generator loss.
    adversarial_weight: float = 0.01
    #: Decay per step of the exported moving average of the generator's weights (0: export the last weights).
    ema_decay: float = 0.999
    #: Largest elastic displacement, in pixels of the 2 mm grid, in half of the geometric augmentations
    #: (0: affine only).
    elastic_px: float = 3.0
    #: Fraction of phase-1 training slices skull-stripped by the augmentation (0: none; phase 2 ignores it).
    skull_strip_prob: float = 0.25
    #: On CUDA, run the networks in bfloat16 (float16 on GPUs without it) under autocast, losses and
    #: weights in float32 (ignored on the CPU; the shipped weights were trained on the CPU, in float32).
    mixed_precision: bool = True

    @classmethod
    def fine_tuning(cls) -> TrainingRecipe:
        """The recipe of a run that starts from existing weights: :data:`FINE_TUNE_LR`, the rest as
        trained from scratch (the architecture comes from the weights)."""
        return cls(lr=FINE_TUNE_LR)

    def __post_init__(self) -> None:
        if self.elastic_px < 0:
            raise UsageError(f"elastic_px must be >= 0, not {self.elastic_px}")
        if not 0.0 <= self.skull_strip_prob <= 1.0:
            raise UsageError(f"skull_strip_prob must be in [0, 1], not {self.skull_strip_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(f"ema_decay must be in [0, 1), not {self.ema_decay}")

    @classmethod
    def from_weights(cls, meta: dict) -> TrainingRecipe:
        """The recipe an exported weights JSON records (``meta`` as loaded from ``<phase>.json``).

        The JSON's ``recipe`` holds every field, ``batch_size`` summed over the DDP processes
        (``world_size``); the weights exported before the recipe had ``base`` and ``depth``
        (0.1.0) keep them in ``architecture`` only.
        """
        architecture = meta.get("architecture", {})
        stored = {**{k: architecture[k] for k in ("base", "depth") if k in architecture}, **meta["recipe"]}
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in stored.items() if k in fields}
        if "batch_size" in values:
            values["batch_size"] //= int(stored.get("world_size", 1))
        return cls(**values)
