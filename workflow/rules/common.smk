# Configuration, validated at load, and the helpers that turn it into file lists.

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))

from snakemake.exceptions import WorkflowError  # noqa: E402

from quari.config import validate_config  # noqa: E402

config.update(validate_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"))

PAPER_NUMBERS = str(Path(workflow.basedir) / "workflow/resources/paper_numbers.csv")
BACKBONES = config["backbones"]
METHODS = config["methods"]
ILIAS_TASKS = config["evaluation"]["ilias"]["tasks"]
BENCHMARKS = ["ilias", "inquire"]
TRAINSET = "synthetic" if config["data"] == "synthetic" else "train"

if config["data"] == "real":
    raise WorkflowError(
        "data: real needs the real-data stage (ILIAS / INQUIRE downloads, backbones, embedding "
        "cache), which is not implemented yet; run the offline default (workflow/config/config.yaml)")

def _check_config_early():
    """Errors in nested settings (world, model, training, method names) at load, not mid-run."""
    from baselines import get_method
    from quari.model import QuARIConfig
    from quari.training import TrainConfig

    for name in METHODS:
        try:
            get_method(method_type(name))
        except KeyError as err:
            raise WorkflowError(f"methods.{name}: {err.args[0]}") from None
    try:
        QuARIConfig(embedding_dim=8, **{**config["quari"]["model"], "hidden_dim": 8, "nhead": 1})
        TrainConfig(**config["quari"]["train"])
    except (TypeError, ValueError) as err:
        raise WorkflowError(f"quari: {err}") from None
    if config["data"] == "synthetic":
        from quari.synthetic import WorldConfig

        try:
            WorldConfig.from_dict({**config["synthetic"].get("world", {}),
                                   "seed": config["synthetic"]["seed"]})
        except (TypeError, ValueError) as err:
            raise WorkflowError(f"synthetic.world: {err}") from None


if config["data"] == "synthetic":
    _unknown = [b for b in BACKBONES if b not in config["synthetic"]["backbones"]]
    if _unknown:
        raise ValueError(f"backbones {_unknown} are not defined under synthetic.backbones "
                         f"(defined: {', '.join(config['synthetic']['backbones'])})")


wildcard_constraints:
    backbone="|".join(map(re.escape, BACKBONES)),
    method="|".join(METHODS),
    benchmark="|".join(BENCHMARKS),


def method_type(method):
    """The registered method a config entry uses (its `type`, else its own name)."""
    return METHODS[method].get("type", method)


def method_params(method):
    return {k: v for k, v in METHODS[method].items() if k != "type"}


def get_train_inputs(wildcards):
    """What training a method needs: the collection, and semi-positives for QuARI."""
    inputs = {
        "train": f"results/embeddings/{TRAINSET}/{wildcards.backbone}/train",
        "valid": f"results/embeddings/{TRAINSET}/{wildcards.backbone}/valid",
    }
    if method_type(wildcards.method) == "quari":
        inputs["semipositives"] = f"results/mining/{TRAINSET}/{wildcards.backbone}/semipositives.npz"
    if method_type(wildcards.method) == "oracle":
        inputs["oracle"] = f"results/embeddings/{TRAINSET}/{wildcards.backbone}/oracle.npz"
    return inputs


def get_eval_inputs(wildcards):
    root = f"results/embeddings/{wildcards.benchmark}/{wildcards.backbone}"
    inputs = {
        "model": f"results/models/{wildcards.method}/{wildcards.backbone}/method.json",
        "gallery": f"{root}/gallery",
        "text_queries": f"{root}/text_queries",
        "positives": f"results/groundtruth/{wildcards.benchmark}.json",
    }
    if wildcards.benchmark == "ilias":
        inputs["image_queries"] = f"{root}/image_queries"
    return inputs


def all_evaluations():
    return expand("results/eval/{benchmark}/{backbone}/{method}.json",
                  benchmark=BENCHMARKS, backbone=BACKBONES, method=list(METHODS))


def figure_backbone(name):
    return config["figures"].get(name, {}).get("backbone", BACKBONES[-1])


_check_config_early()
