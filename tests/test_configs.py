"""Every YAML file in configs/ validates against its pydantic model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dspark.engine import EngineConfig
from dspark.serving.config import ServeConfig
from dspark.training.recipe import RecipeConfig
from dspark.training.train import TrainConfig


class ServeAppConfig:
    """A Ray Serve config file: Ray's own schema, and each application's args as a ServeConfig."""

    @staticmethod
    def model_validate(values: dict) -> None:
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(values)
        for app in schema.applications:
            assert app.import_path == "deployments.dspark_app:build_app"
            ServeConfig.model_validate(app.args)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {
    "engine.yaml": EngineConfig,
    "drafter_smollm2.yaml": TrainConfig,
    "drafter_smollm2_v6.yaml": TrainConfig,
    "drafter_smollm2_v7.yaml": TrainConfig,
    "recipe_arms.yaml": RecipeConfig,
    "serve.yaml": ServeConfig,
    "serve_app.yaml": ServeAppConfig,
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_validates(path: Path):
    assert path.name in MODELS, f"{path.name}: no pydantic model registered for it"
    MODELS[path.name].model_validate(yaml.safe_load(path.read_text()))


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="extra"):
        EngineConfig.model_validate({"proposer": "dspark", "num_speculative_tokenz": 7})
