# Configuration, validated at load, and the helpers that turn it into file lists.

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))

from snakemake.exceptions import WorkflowError  # noqa: E402

from quari.config import validate_config  # noqa: E402

config.update(validate_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"))

# methods of your own outside baselines/ (`method_packages`): this process and every job search them
if config["method_packages"]:
    from quari.methods import METHOD_PACKAGES_ENV, with_method_packages  # noqa: E402

    os.environ[METHOD_PACKAGES_ENV] = with_method_packages(config["method_packages"])

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
    from quari.config import check_parameters

    # every method entry and nested block against the code that takes it (keys and types)
    ignore = ("self", "device", "embedding_dim")
    problems = []
    classes = {}
    for name in METHODS:
        try:
            classes[name] = method_class(name)
        except KeyError as err:
            raise WorkflowError(f"methods.{name}: {err.args[0]}") from None
    # the `quari` block, against the first method that takes its settings
    sharing = [cls for cls in classes.values() if cls.shared_settings]
    if sharing:
        cls = sharing[0]
        problems += check_parameters(cls, {k: v for k, v in config["quari"].items()
                                           if k in cls.shared_settings}, "quari", ignore,
                                     cls.nested_params)
    for name, cls in classes.items():
        problems += check_parameters(cls, own_params(name), f"methods.{name}", ignore,
                                     cls.nested_params)
    if problems:
        raise WorkflowError("invalid configuration:\n  " + "\n  ".join(problems))
    # then their values, as each method checks them when it is built (as train_method builds it)
    for name, cls in classes.items():
        try:
            cls.check_settings(method_params(name))
        except (TypeError, ValueError, KeyError) as err:
            raise WorkflowError(f"methods.{name}: {err}") from None
    # side inputs this kind of data has no rule for
    evaluated = {m for _, _, m in evaluation_matrix()}
    lacking = {m: [s for s in classes[m].side_inputs if s not in AVAILABLE_SIDE_INPUTS]
               for m in METHODS if m in evaluated}
    lacking = {m: s for m, s in lacking.items() if s}
    if lacking:
        other = "real" if config["data"] == "synthetic" else "synthetic"
        raise WorkflowError(f"methods {sorted(lacking)}: they need {lacking} (side inputs), which "
                            f"{config['data']} data does not provide; run them with data: {other}")
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
            cls = classes[method]
            if "backbone" in cls.side_inputs:
                _check_backbones(n, method, cls, block["backbones"])
            only = cls.benchmarks
            other = [b for b in block["benchmarks"] if only is not None and b not in only]
            if other:
                verb = "re-ranks" if cls.reranker_only else "runs on"
                raise WorkflowError(f"evaluations[{n}]: {method} ({method_type(method)}) {verb} "
                                    f"{' / '.join(only)} only (its inputs are that benchmark's "
                                    f"files), not {other}")
    if config["figures"]["tsne"]["method"] not in METHODS:
        raise WorkflowError(f"figures.tsne.method: {config['figures']['tsne']['method']!r} is not "
                            f"an entry of methods ({', '.join(METHODS)})")
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


def method_class(method):
    """The class of a config entry's method: what it declares (quari.methods.RetrievalMethod)
    decides its inputs, settings and where it runs."""
    from quari.methods import get_method

    return get_method(method_type(method))


# keys of a method entry that the workflow reads and the method never sees
WORKFLOW_KEYS = ("type", "training_set")


def own_params(method):
    """The settings of a method's own config entry."""
    return {k: v for k, v in METHODS[method].items() if k not in WORKFLOW_KEYS}


def method_params(method):
    """Every setting a method is built with: its entry over the keys of the `quari` block it
    shares (its class's `shared_settings`; nothing for most methods), so that editing
    `quari.train` concerns only the methods that train with QuARI's recipe."""
    from quari.config import deep_merge

    shared = method_class(method).shared_settings
    return deep_merge({k: v for k, v in config["quari"].items() if k in shared}, own_params(method))


def training_set_of(method):
    """The training collection a method is fitted on (real data: its `training_set`, else the
    configured default)."""
    if config["data"] == "synthetic":
        return TRAINSET
    return METHODS[method].get("training_set", config["real"]["default_training_set"])


# The side inputs a method may declare (RetrievalMethod.side_inputs), with the file each is: the
# training collection's mined semi-positives and, per kind of data, what its rules prepare. The
# synthetic world has its true subspaces (the oracle); real data has DINOv2 local descriptors of
# ILIAS images and INQUIRE-Rerank's candidate images and query texts as files, and the backbones'
# registry entries (`backbone`, no file).
SIDE_INPUTS = {
    "semipositives": "results/mining/{trainset}/{backbone}/semipositives.npz",
    **({"oracle_file": "results/embeddings/{trainset}/{backbone}/oracle.npz"}
       if config["data"] == "synthetic" else {
        "local_descriptors": "results/local_descriptors/ilias/{backbone}/database.npz",
        "query_local_descriptors": "results/local_descriptors/ilias/queries.npz",
        "gallery_images": "results/data/inquire_rerank_images.tsv",
        "query_texts": "results/data/inquire_rerank_queries.tsv",
    }),
}
AVAILABLE_SIDE_INPUTS = [*SIDE_INPUTS, *(["backbone"] if config["data"] == "real" else [])]


def get_train_inputs(wildcards):
    """What fitting a method reads: the training collection when it uses one, and the files of
    the side inputs it declares."""
    cls = method_class(wildcards.method)
    trainset = training_set_of(wildcards.method)
    inputs = {}
    if cls.uses_training_data:
        inputs["train"] = f"results/embeddings/{trainset}/{wildcards.backbone}/train"
        inputs["valid"] = f"results/embeddings/{trainset}/{wildcards.backbone}/valid"
    for name in cls.side_inputs:
        if name in SIDE_INPUTS:
            inputs[name] = SIDE_INPUTS[name].format(trainset=trainset, backbone=wildcards.backbone)
    return inputs


def get_train_models(wildcards):
    """real.models restricted to the backbone, for a method given the backbone's registry entry
    (its local path and overrides, if any); nothing for the others."""
    if "backbone" not in method_class(wildcards.method).side_inputs:
        return {}
    models = config.get("real", {}).get("models", {})
    return {wildcards.backbone: models[wildcards.backbone]} if wildcards.backbone in models else {}


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


def _check_backbones(n, method, cls, backbones):
    """A method given the backbone's registry entry may refuse some backbones (a released
    checkpoint runs only on the backbone it was trained on): checked at load."""
    from quari.data.embedding_jobs import configured_backbone

    for name in backbones:
        info, _ = configured_backbone(name, config["real"].get("models"))
        try:
            cls.check_backbone(info)
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
    """Figure 3's inputs: QuARI (`method`) on the figure's backbone, an ILIAS gallery (`ilias_benchmark`)
    with the ILIAS image queries, and an INQUIRE gallery with its text queries
    (`inquire_benchmark`: Fullrank's pool, or INQUIRE-Rerank's candidates)."""
    tsne = config["figures"]["tsne"]
    bb = figure_backbone("tsne")
    ilias_b = tsne.get("ilias_benchmark", "ilias")
    inquire_b = tsne.get("inquire_benchmark", "inquire")
    return {
        "model": f"results/models/{tsne['method']}/{bb}/method.json",
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
