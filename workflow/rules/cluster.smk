# Helpers for what jobs ask of a cluster (docs/cluster.md): which methods train (and so need a
# GPU), and how the large real-data sets fan out into one job per group of source shards.

import os

# Every job imports this checkout's `quari` library, whatever environment runs it (the shared
# virtualenv, or workflow/envs/quari.yaml built by Snakemake on a node): jobs, local or submitted
# to SLURM (which exports the submitting environment), inherit this.
_pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if _pythonpath[:1] != [workflow.basedir]:
    os.environ.update(PYTHONPATH=os.pathsep.join([workflow.basedir, *_pythonpath]))


def method_trains(method):
    """Whether fitting `method` learns anything (else its job only records its settings)."""
    return method_class(method).trainable


if config["data"] == "real":
    # Fan-out (docs/cluster.md). The large sets are downloaded and embedded one group of source
    # shards per job, each job writing its own part; `assemble_gallery` lists the parts' shards in
    # one manifest (a view, nothing copied). The number of groups is fixed when the DAG is built:
    # from real.ilias.yfcc_shards (null: ILIAS's 1,000 YFCC100M shards) and real.ilias.mini_shards,
    # in groups of real.fan_out.*_shards_per_job; the iNat24 pool in real.fan_out.inquire_pool_jobs
    # equal slices of its sorted image list.
    REAL = config["real"]
    FAN_OUT = REAL["fan_out"]
    ILIAS_YFCC_SHARDS = REAL["ilias"]["yfcc_shards"] or 1000
    SOURCE_GROUPS = {
        "ilias_yfcc": len(range(0, ILIAS_YFCC_SHARDS, FAN_OUT["ilias_yfcc_shards_per_job"])),
        "ilias_mini": len(range(0, REAL["ilias"]["mini_shards"], FAN_OUT["ilias_mini_shards_per_job"])),
    }
    # Training collections in parts (quari/data/training_parts.py): real.fan_out.collection_jobs
    # parts per collection (default one): a webdataset (CC12M) one group of its tars per part,
    # downloaded by its own job; UnED or a table an equal slice of its list. A training set is
    # assembled from its collections' parts by `assemble_training_set`.
    COLLECTION_JOBS = FAN_OUT["collection_jobs"]
    for _c, _n in COLLECTION_JOBS.items():
        _cfg = REAL["collections"].get(_c)
        if _cfg is None:
            raise WorkflowError(f"real.fan_out.collection_jobs.{_c}: no such collection in "
                                f"real.collections ({', '.join(REAL['collections'])})")
        if _n > 1 and _cfg["format"] == "coco":
            raise WorkflowError(f"real.fan_out.collection_jobs.{_c}: MS-COCO lists its captions "
                                "by annotation, not by image, so it is embedded as one part")
        if _n > 1 and _cfg["format"] == "webdataset" and _cfg.get("max_images") is not None:
            raise WorkflowError(f"real.collections.{_c}: max_images cannot be cut into groups of "
                                f"tars (real.fan_out.collection_jobs.{_c}: {_n}); use max_shards")
    WEBDATASET_GROUPS = {c: n for c, n in COLLECTION_JOBS.items()
                         if n > 1 and REAL["collections"][c]["format"] == "webdataset"}
    SOURCE_GROUPS.update(WEBDATASET_GROUPS)
    # the settings of real.ilias / real.inquire each download reads (editing another leaves it be)
    SOURCE_KEYS = {
        "ilias_core": ("hf_repo", "query_shards", "positive_shards", "server_url"),
        "ilias_mini": ("hf_repo", "mini_pattern", "mini_shards"),
        "ilias_yfcc": ("server_url", "yfcc_shards"),
        "inquire": ("split", "csv_url", "pool", "precomputed", "inat24_url", "inat24_md5"),
        "inquire_rerank": ("split", "csv_url", "rerank_repo", "rerank_patterns"),
    }


    def source_settings(source):
        """What the download job of `source` reads: its own keys of real.ilias / real.inquire, or its
        collection's entry (without max_images, which only the embedding reads)."""
        if source in SOURCE_KEYS:
            section = REAL["inquire" if source.startswith("inquire") else "ilias"]
            return {k: section.get(k) for k in SOURCE_KEYS[source]}
        own = {k: v for k, v in REAL["collections"][source].items() if k != "max_images"}
        return {**own, "groups": WEBDATASET_GROUPS[source]} if source in WEBDATASET_GROUPS else own


    def source_group_names(source):
        return [f"{g:04d}" for g in range(SOURCE_GROUPS[source])]


    def model_entry(backbone):
        """real.models restricted to one backbone (its local path and overrides, if any)."""
        return {backbone: REAL["models"][backbone]} if backbone in REAL["models"] else {}


    def gallery_part_dirs(dataset, backbone):
        """The parts a gallery is assembled from, in row order: ILIAS's core positives (one part,
        shared by the 100M and 5M galleries), then one part per group of distractor shards; the
        iNat24 pool in equal slices."""
        root = f"results/embeddings/{dataset}/{backbone}/gallery-parts"
        core = f"results/embeddings/ilias/{backbone}/gallery-parts/core"
        if dataset == "ilias":
            return [core, *(f"{root}/yfcc-{g}" for g in source_group_names("ilias_yfcc"))]
        if dataset == "ilias_mini":
            return [core, *(f"{root}/mini-{g}" for g in source_group_names("ilias_mini"))]
        return [f"{root}/pool-{p:04d}" for p in range(FAN_OUT["inquire_pool_jobs"])]


    def gallery_part_input(wildcards):
        kind, _, group = wildcards.part.partition("-")
        if kind == "core":
            return {"files": "results/data/ilias_core.json"}
        if kind == "pool":
            return {"files": "results/data/inquire.json"}
        source = {"yfcc": "ilias_yfcc", "mini": "ilias_mini"}[kind]
        return {"files": f"results/data/{source}/group-{group}.json"}


    def gallery_part_settings(wildcards):
        """What a part's rows depend on besides its inputs: the pool slice for iNat24."""
        if wildcards.part.startswith("pool-"):
            return {"slice": int(wildcards.part.split("-")[1]), "of": FAN_OUT["inquire_pool_jobs"],
                    "max_pool_images": REAL["inquire"].get("max_pool_images")}
        return {}


    def yfcc_group_manifests(wildcards=None):
        return [f"results/data/ilias_yfcc/group-{g}.json" for g in source_group_names("ilias_yfcc")]


    # backbones whose iNat24 pool comes as the benchmark's precomputed embeddings (no fan-out)
    PRECOMPUTED_POOL = "|".join(map(re.escape, REAL["inquire"].get("precomputed", {}))) or "(?!)"


    def collection_parts(collection):
        return COLLECTION_JOBS.get(collection, 1)


    def training_part_dirs(trainset, backbone):
        """The parts a training set is assembled from, in row order: its collections in turn,
        each in its parts."""
        root = f"results/embeddings/{trainset}/{backbone}/training-parts"
        return [f"{root}/{c}/{p:04d}" for c in REAL["training_sets"][trainset]
                for p in range(collection_parts(c))]


    def training_part_input(wildcards):
        c = wildcards.collection
        if c in WEBDATASET_GROUPS:
            return {"files": f"results/data/{c}/group-{wildcards.part}.json"}
        return {"files": f"results/data/{c}.json"}


    def training_part_settings(wildcards):
        """What a training part's rows depend on besides its inputs: which part of how many, the
        collection's held-out fraction and image protocol (its own, else its format's default,
        else real.valid_fraction / the model's transform)."""
        from quari.data.collections import collection_setting
        c = wildcards.collection
        cfg = REAL["collections"][c]
        return {"collection": c, "part": int(wildcards.part), "of": collection_parts(c),
                "valid_fraction": collection_setting(cfg, "valid_fraction", REAL["valid_fraction"]),
                "protocol": collection_setting(cfg, "protocol", "model")}
