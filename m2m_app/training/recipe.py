"""The default training recipe: the settings the shipped weights were trained with.

``m2m-train phase1/phase2`` and :func:`m2m_app.training.loop.train_phase` take their
defaults from here, so that training on a new dataset without options follows the recipe
the model card measured. ``scripts/train_shipped_weights.sh`` still spells every setting
out, so that it reproduces the shipped weights whatever these defaults become; a test
checks that these values are the ones recorded in the shipped weights' JSON.

This module imports nothing heavy (the CLI reads it to build ``--help``).
"""

#: Channels of the translator's first encoder level (doubled per level).
WIDTH = 16
#: Poolings of the translator's encoder.
DEPTH = 4
#: Channels of the first level of both discriminators (not exported).
DISC_WIDTH = 32
#: Slices per optimisation step (per process under DDP).
BATCH_SIZE = 8
#: Adam learning rate of the generator and of the discriminators.
LEARNING_RATE = 2e-4
#: Decay per step of the exported moving average of the generator's weights (0: export the last weights).
EMA_DECAY = 0.999
#: Largest elastic displacement, in pixels of the 2 mm grid, in half of the geometric augmentations (0: affine only).
ELASTIC_PX = 3.0
#: Fraction of phase-1 training slices skull-stripped by the augmentation (0: none).
SKULL_STRIP_PROB = 0.25
#: Weight of each discriminator's LSGAN term in the generator loss.
ADVERSARIAL_WEIGHT = 0.01
