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
# real data: ilias = full 100M gallery, ilias_mini = the 5M gallery (queries shared with ilias),
# inquire = Fullrank over the iNat24 pool, inquire_rerank = the fixed 100 candidates per query
BENCHMARKS = (["ilias", "inquire"] if config["data"] == "synthetic"
              else ["ilias", "ilias_mini", "inquire", "inquire_rerank"])
TRAINSET = "synthetic" if config["data"] == "synthetic" else None
# sources of real data with one manifest each (results/data/{source}.json)
REAL_SOURCES = (["ilias_core", "ilias_mini", "ilias_yfcc", "inquire", "inquire_rerank",
                 *config.get("real", {}).get("collections", {})] if config["data"] == "real" else [])

def _check_config_early():
    """Errors in nested settings (world, model, training, method names) at load, not mid-run."""
    from quari.config import check_parameters, deep_merge
    from quari.methods import get_method
    from quari.model import QuARIConfig
    from quari.training import TrainConfig

    # every method entry and nested block against the code that takes it (keys and types)
    nested = {"quari": {"model": QuARIConfig, "train": TrainConfig},
              "finetuned_backbone": {"train": TrainConfig}}
    ignore = ("self", "device", "embedding_dim")
    problems = check_parameters(TrainConfig, config["quari"]["train"], "quari.train", ignore)
    for name in METHODS:
        try:
            cls = get_method(method_type(name))
        except KeyError as err:
            raise WorkflowError(f"methods.{name}: {err.args[0]}") from None
        problems += check_parameters(cls, method_params(name), f"methods.{name}", ignore,
                                     nested.get(method_type(name)))
    if problems:
        raise WorkflowError("invalid configuration:\n  " + "\n  ".join(problems))
    try:
        QuARIConfig(embedding_dim=8, **{**config["quari"]["model"], "hidden_dim": 8, "nhead": 1})
        TrainConfig(**config["quari"]["train"])
    except (TypeError, ValueError) as err:
        raise WorkflowError(f"quari: {err}") from None
    # then their values, as each method checks them when it is built (as train_method builds it)
    for name in METHODS:
        kind, params = method_type(name), method_params(name)
        try:
            if kind == "quari":
                params = deep_merge(config["quari"], params)
                QuARIConfig(embedding_dim=8, **{**params["model"], "hidden_dim": 8, "nhead": 1})
            if kind == "finetuned_backbone":
                params = deep_merge({"train": config["quari"]["train"]}, params)
            if "train" in params and kind in nested:
                TrainConfig(**params["train"])
            get_method(kind)(**params, device="cpu")
        except (TypeError, ValueError, KeyError) as err:
            raise WorkflowError(f"methods.{name}: {err}") from None
    if config["data"] == "synthetic":
        needs_real = [m for m in METHODS if method_type(m) in RERANKER_BENCHMARK]
        if needs_real:
            raise WorkflowError(f"methods {needs_real}: they re-rank real images or local "
                                "descriptors; run them with data: real")
    if config["data"] == "real":
        _check_real_config()
        if "evaluations" not in config:
            raise WorkflowError("data: real needs `evaluations` (which benchmark x backbone x "
                                "method to run; see workflow/config/paper.yaml)")
    for n, block in enumerate(config.get("evaluations", [])):
        for key, known in (("benchmarks", BENCHMARKS), ("backbones", BACKBONES),
                           ("methods", list(METHODS))):
            unknown = [x for x in block[key] if x not in known]
            if unknown:
                raise WorkflowError(f"evaluations[{n}].{key}: {unknown} not among {known}")
        for method in block["methods"]:
            if method_type(method) == "quari_released":
                _check_released_backbones(n, method, block["backbones"])
            only = RERANKER_BENCHMARK.get(method_type(method))
            other = [b for b in block["benchmarks"] if b != only]
            if only and other:
                raise WorkflowError(f"evaluations[{n}]: {method} ({method_type(method)}) re-ranks "
                                    f"{only} only (its inputs are that benchmark's files), not {other}")
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
    method="|".join(map(re.escape, METHODS)),
    benchmark="|".join(BENCHMARKS),


def method_type(method):
    """The registered method a config entry uses (its `type`, else its own name)."""
    return METHODS[method].get("type", method)


# keys of a method entry that the workflow reads and the method never sees
WORKFLOW_KEYS = ("type", "training_set")


def method_params(method):
    return {k: v for k, v in METHODS[method].items() if k not in WORKFLOW_KEYS}


def training_set_of(method):
    """The training collection a method is fitted on (real data: its `training_set`, else the
    configured default)."""
    if config["data"] == "synthetic":
        return TRAINSET
    return METHODS[method].get("training_set", config["real"]["default_training_set"])


# methods trained on QuARI's training pairs (its `quari.train` recipe, semi-positives included)
QUARI_DATA_METHODS = ("quari", "finetuned_backbone")
# Table 3 re-rankers that read more than embeddings (real data only): DINOv2 local descriptors
# of ILIAS images (3a), INQUIRE-Rerank's candidate images and query texts (3b)
LOCAL_FEATURE_METHODS = ("chamfer", "spatial_verification", "ames")
VLM_METHODS = ("vlm_reranker",)
# the one benchmark each of them runs on (their inputs are that benchmark's files)
RERANKER_BENCHMARK = {**dict.fromkeys(LOCAL_FEATURE_METHODS, "ilias"),
                      **dict.fromkeys(VLM_METHODS, "inquire_rerank")}


def get_train_inputs(wildcards):
    """What training a method needs: the collection, and semi-positives for QuARI; nothing for
    a method fitted without training data (a released checkpoint)."""
    from quari.methods import get_method

    if not getattr(get_method(method_type(wildcards.method)), "uses_training_data", True):
        return {}
    trainset = training_set_of(wildcards.method)
    inputs = {
        "train": f"results/embeddings/{trainset}/{wildcards.backbone}/train",
        "valid": f"results/embeddings/{trainset}/{wildcards.backbone}/valid",
    }
    if method_type(wildcards.method) in QUARI_DATA_METHODS:
        inputs["semipositives"] = f"results/mining/{trainset}/{wildcards.backbone}/semipositives.npz"
    if method_type(wildcards.method) == "oracle":
        inputs["oracle"] = f"results/embeddings/{trainset}/{wildcards.backbone}/oracle.npz"
    if method_type(wildcards.method) in LOCAL_FEATURE_METHODS:  # the fit context's files
        inputs["local_descriptors"] = (f"results/local_descriptors/ilias/{wildcards.backbone}/"
                                       "database.npz")
        inputs["query_local_descriptors"] = "results/local_descriptors/ilias/queries.npz"
    if method_type(wildcards.method) in VLM_METHODS:
        inputs["gallery_images"] = "results/data/inquire_rerank_images.tsv"
        inputs["query_texts"] = "results/data/inquire_rerank_queries.tsv"
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
    if wildcards.benchmark == "ilias_mini":  # same queries and ground truth as the 100M setting
        queries = f"results/embeddings/ilias/{wildcards.backbone}"
        inputs.update(image_queries=f"{queries}/image_queries", text_queries=f"{queries}/text_queries",
                      positives="results/groundtruth/ilias.json")
    if wildcards.benchmark == "inquire_rerank":
        inputs["candidates"] = "results/groundtruth/inquire_rerank_candidates.json"
    return inputs


def evaluation_matrix():
    """(benchmark, backbone, method) triples to evaluate: the union of the `evaluations` blocks
    (the paper's sparse matrix on real data); on synthetic data without them, every combination."""
    if "evaluations" not in config:
        return [(b, bb, m) for b in BENCHMARKS for bb in BACKBONES for m in METHODS]
    triples = []
    for block in config["evaluations"]:
        for b in block["benchmarks"]:
            for bb in block["backbones"]:
                for m in block["methods"]:
                    if (b, bb, m) not in triples:
                        triples.append((b, bb, m))
    return triples


def all_evaluations():
    return [f"results/eval/{b}/{bb}/{m}.json" for b, bb, m in evaluation_matrix()]


def get_training_set_files(wildcards):
    """Manifests of the collections a training set merges."""
    return [f"results/data/{c}.json" for c in config["real"]["training_sets"][wildcards.trainset]]


def _check_released_backbones(n, method, backbones):
    """A released checkpoint runs only on the backbone it was trained on (checked at load)."""
    from baselines.quari_released import release_for
    from quari.data.embedding_jobs import configured_backbone

    if config["data"] != "real":
        raise WorkflowError(f"evaluations[{n}]: {method} evaluates the authors' checkpoints on "
                            "real backbones; run it with data: real")
    for name in backbones:
        info, _ = configured_backbone(name, config["real"].get("models"))
        try:
            release_for(info)
        except ValueError as err:
            raise WorkflowError(f"evaluations[{n}]: {method}: {err}") from None


def _check_real_config():
    """Names in the real-data sections refer to things that exist, checked at load."""
    from quari.data.embedding_jobs import configured_backbone

    from quari.backbones import BackboneInfo
    from quari.config import check_parameters

    real = config["real"]
    problems = []
    for name, entry in real.get("models", {}).items():  # overrides: BackboneInfo's fields
        overrides = {k: v for k, v in entry.items() if k not in ("path", "like")}
        problems += check_parameters(BackboneInfo, overrides, f"real.models.{name}", ("name",))
    if problems:
        raise WorkflowError("invalid configuration:\n  " + "\n  ".join(problems))
    for name in BACKBONES:
        try:
            configured_backbone(name, real.get("models"))
        except (KeyError, ValueError) as err:
            raise WorkflowError(f"backbones: {err.args[0]}") from None
    from quari.data.inquire import check_precomputed

    inquire_cfg = real["inquire"]
    on_inquire = {bb for b, bb, _ in evaluation_matrix() if b == "inquire"}
    for name in sorted(set(inquire_cfg.get("precomputed", {})) | (
            on_inquire if inquire_cfg.get("pool") == "precomputed" else set())):
        folder = inquire_cfg.get("precomputed", {}).get(name)
        if folder is None:
            raise WorkflowError(f"real.inquire.pool is precomputed but real.inquire.precomputed "
                                f"has no folder for backbone {name}")
        info, _ = configured_backbone(name, real.get("models"))
        try:
            check_precomputed(info, folder)
        except ValueError as err:
            raise WorkflowError(f"real.inquire.precomputed.{name}: {err}") from None
    collections = real["collections"]
    for trainset, names in real["training_sets"].items():
        if trainset in BENCHMARKS:
            raise WorkflowError(f"real.training_sets.{trainset}: the name of a benchmark")
        unknown = [c for c in names if c not in collections]
        if unknown:
            raise WorkflowError(f"real.training_sets.{trainset}: unknown collection(s) {unknown}; "
                                f"defined under real.collections: {', '.join(collections)}")
    for method in METHODS:
        trainset = training_set_of(method)
        if trainset not in real["training_sets"]:
            raise WorkflowError(f"methods.{method}: training set {trainset!r} is not defined under "
                                f"real.training_sets ({', '.join(real['training_sets'])})")



def get_tsne_inputs(wildcards):
    """Figure 3's inputs: QuARI on the figure's backbone, an ILIAS gallery (`ilias_benchmark`)
    with the ILIAS image queries, and an INQUIRE gallery with its text queries
    (`inquire_benchmark`: Fullrank's pool, or INQUIRE-Rerank's candidates)."""
    tsne = config["figures"]["tsne"]
    bb = figure_backbone("tsne")
    ilias_b = tsne.get("ilias_benchmark", "ilias")
    inquire_b = tsne.get("inquire_benchmark", "inquire")
    return {
        "model": f"results/models/quari/{bb}/method.json",
        "ilias": f"results/embeddings/{ilias_b}/{bb}/gallery",
        "ilias_queries": f"results/embeddings/ilias/{bb}/image_queries",
        "inquire": f"results/embeddings/{inquire_b}/{bb}/gallery",
        "inquire_queries": f"results/embeddings/{inquire_b}/{bb}/text_queries",
        "ilias_positives": "results/groundtruth/ilias.json",
        "inquire_positives": f"results/groundtruth/{inquire_b}.json",
    }


def figure_backbone(name):
    return config["figures"].get(name, {}).get("backbone", BACKBONES[-1])


def cost_accuracy_backbones():
    """Figure 4's backbone per panel: (ILIAS, INQUIRE); each defaults to `backbone`."""
    fig = config["figures"].get("cost_accuracy", {})
    backbone = figure_backbone("cost_accuracy")
    return fig.get("ilias_backbone", backbone), fig.get("inquire_backbone", backbone)


def cost_accuracy_evaluations():
    """Figure 4's inputs: the ILIAS evaluations (of `ilias_benchmark`, default the 100M gallery)
    on the ILIAS panel's backbone and the INQUIRE (Fullrank or Rerank) evaluations on the INQUIRE
    panel's backbone."""
    ilias_bb, inquire_bb = cost_accuracy_backbones()
    ilias_benchmark = config["figures"].get("cost_accuracy", {}).get("ilias_benchmark", "ilias")
    return [f"results/eval/{b}/{bb}/{m}.json" for b, bb, m in evaluation_matrix()
            if (b == ilias_benchmark and bb == ilias_bb)
            or (b in ("inquire", "inquire_rerank") and bb == inquire_bb)]


_check_config_early()
