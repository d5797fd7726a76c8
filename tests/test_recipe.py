"""TrainingRecipe: its defaults are the shipped recipe, it reads every weights JSON m2m wrote."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from m2m_app.errors import UsageError
from m2m_app.training.recipe import TrainingRecipe

MODELS = Path(__file__).resolve().parents[1] / "m2m_app" / "data" / "models"


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_weights_json_loads_as_a_recipe(path):
    meta = json.loads(path.read_text())
    recipe = TrainingRecipe.from_weights(meta)
    assert recipe.base == meta["architecture"]["base"] and recipe.depth == meta["architecture"]["depth"]
    assert recipe.epochs == meta["recipe"]["epochs"] and recipe.lr == meta["recipe"]["lr"]
    # everything else the shipped run used is the default
    assert (
        dataclasses.replace(recipe, epochs=TrainingRecipe().epochs, skull_strip_prob=TrainingRecipe().skull_strip_prob)
        == TrainingRecipe()
    )


def test_an_exported_record_reads_back_as_its_recipe():
    recipe = TrainingRecipe(epochs=2, batch_size=4, lr=1e-3, base=8, depth=2, elastic_px=2.0)
    record = {**dataclasses.asdict(recipe), "batch_size": 8, "world_size": 2, "phase": "phase1", "subjects": []}
    assert TrainingRecipe.from_weights({"architecture": {"base": 16, "depth": 4}, "recipe": record}) == recipe


@pytest.mark.parametrize(
    "change, words",
    [
        ({"elastic_px": -1.0}, "elastic_px"),
        ({"skull_strip_prob": 1.5}, "skull_strip_prob"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_recipe_refuses_values_out_of_range(change, words):
    with pytest.raises(UsageError, match=words):
        TrainingRecipe(**change)
