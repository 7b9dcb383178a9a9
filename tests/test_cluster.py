"""Paper scale on a cluster: what every job asks for, the profiles, and (marker ``cluster``) the
real-data DAG through Snakemake's SLURM executor on a one-node SLURM (.ci/start_slurm.sh).

The dry runs read each job's resources from Snakemake's own job listing; which rules are GPU
stages is read from the rule files (a rule that passes ``device=config["device"]`` to its
script runs a network on it), independently of the resources the rules declare.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from tests.builders import ROOT, SNAKEMAKE, job_resources, snakemake


PROFILES = ROOT / "workflow" / "profiles"


def rules_running_a_network() -> set[str]:
    """Rules whose params hand the configured device to their script (read from the sources)."""
    found = set()
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=\s*rule \w+:)", path.read_text()):
            match = re.match(r"\s*rule (\w+):", block)
            if match and re.search(r"device=config\[\"device\"\]", block):
                found.add(match.group(1))
    return found


def test_no_rule_takes_every_core():
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        assert "workflow.cores" not in path.read_text(), path.name


@pytest.fixture(scope="module")
def paper_dry_run(tmp_path_factory):
    """The paper configuration's dry run through the SLURM profile (as the README shows it)."""
    work = tmp_path_factory.mktemp("paper-slurm")
    run = snakemake(work, "-n", "--profile", str(PROFILES / "slurm"), "--configfile",
                    str(ROOT / "workflow/config/paper.yaml"), "--replace-workflow-config",
                    "results/table1.csv", cores=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def test_every_paper_job_declares_memory_time_and_gpus(paper_dry_run):
    jobs = job_resources(paper_dry_run)
    assert len(jobs) > 150
    gpu_rules = rules_running_a_network()
    # the embedding, local-descriptor, training and evaluation rules, at least
    assert {"train_method", "evaluate", "extract_ilias_query_local_descriptors"} <= gpu_rules
    assert any(r.startswith("embed_") for r in gpu_rules)
    for rule, res in jobs:
        assert int(res["mem_mb"]) > 0 and int(res["runtime"]) > 0, (rule, res)
        gpus = int(res.get("gpu", 0))
        if rule not in gpu_rules:
            assert gpus == 0, f"{rule} runs no network but asks for a GPU"
        elif rule == "train_method" and gpus == 0:
            continue  # nothing to fit (identity, alpha-QE, re-rankers): checked below
        else:
            assert gpus == 1, f"GPU stage {rule} asks for {gpus} GPUs: {res}"
    fits = {res.get("gpu") for rule, res in jobs if rule == "train_method"}
    assert fits == {"0", "1"}  # QuARI etc. train on a GPU; identity only records its settings


def test_slurm_profile_maps_gpus_for_the_plugin():
    profile = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["jobs"] > 0 and profile["latency-wait"] > 0 and profile["retries"] >= 1
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Job:  # what the plugin reads off a job that asks for one GPU
        resources = {"gpu": 1}

    Job.resources = type("R", (dict,), {"__getattr__": dict.get})(Job.resources)
    assert set_gres_string(Job()).strip() == "--gpus=1"


def test_default_profile_runs_gpu_jobs_one_at_a_time_on_one_machine():
    profile = yaml.safe_load((PROFILES / "default" / "config.yaml").read_text())
    assert "executor" not in profile and "gpu=1" in profile["resources"]


def test_paper_dry_run_fans_out_every_large_set(paper_dry_run):
    """At least one embedding job per group of YFCC100M shards per backbone (1,000 shards:
    ILIAS's 100M gallery), per group of CC12M tars / slice of UnED per backbone that trains on
    them, and per slice of Table 3a's shortlist, each asking for a GPU; galleries, training sets
    and the local descriptors are assembled from their parts."""
    from quari.config import validate_config
    config = validate_config(yaml.safe_load((ROOT / "workflow/config/paper.yaml").read_text()),
                             ROOT / "workflow/schemas/config.schema.yaml")
    fan_out, ilias = config["real"]["fan_out"], config["real"]["ilias"]
    assert ilias["yfcc_shards"] is None  # the whole 100M gallery
    yfcc_groups = -(-1000 // fan_out["ilias_yfcc_shards_per_job"])
    mini_groups = -(-ilias["mini_shards"] // fan_out["ilias_mini_shards_per_job"])
    assert ilias["mini_shards"] == 45 and yfcc_groups > 1
    parts: dict[tuple[str, str], list[str]] = {}
    part_outputs = [line.split(":", 1)[1].strip() for line in paper_dry_run.splitlines()
                    if line.strip().startswith("output: results/embeddings/")
                    and "/gallery-parts/" in line]
    for out in part_outputs:
        _, _, dataset, backbone, _, part = out.split("/")
        parts.setdefault((dataset, backbone), []).append(part)
    ilias_backbones = {bb for d, bb in parts if d == "ilias"}
    assert len(ilias_backbones) == 7
    for backbone in ilias_backbones:
        yfcc = sorted(p for p in parts[("ilias", backbone)] if p.startswith("yfcc-"))
        assert yfcc == [f"yfcc-{g:04d}" for g in range(yfcc_groups)]
        assert "core" in parts[("ilias", backbone)]  # the positives, shared with mini-ILIAS
        assert sorted(parts[("ilias_mini", backbone)]) == [f"mini-{g:04d}" for g in range(mini_groups)]
    inquire = [p for (d, _), ps in parts.items() if d == "inquire" for p in ps]
    assert len(inquire) == 5 * fan_out["inquire_pool_jobs"]  # Table 2's five pool backbones
    jobs = job_resources(paper_dry_run)
    part_jobs = [res for rule, res in jobs if rule == "embed_gallery_part"]
    assert len(part_jobs) == len(part_outputs) == 7 * (1 + yfcc_groups + mini_groups) + len(inquire)
    assert all(res["gpu"] == "1" for res in part_jobs)
    # the training collections: CC12M one group of tars per job (each group downloaded once,
    # shared by the backbones), UnED in equal slices, COCO and BioTrove one part each
    collection_jobs, sets = fan_out["collection_jobs"], config["real"]["training_sets"]
    assert collection_jobs["cc12m"] > 1 and collection_jobs["uned"] > 1
    training: dict[tuple[str, str], list[str]] = {}
    for line in paper_dry_run.splitlines():
        if line.strip().startswith("output: results/embeddings/") and "/training-parts/" in line:
            _, _, trainset, backbone, _, collection, part = line.split(":", 1)[1].strip().split("/")
            training.setdefault((trainset, backbone), []).append(f"{collection}/{part}")
    assert sorted({t for t, _ in training}) == ["captions", "uned"]
    assert len({b for t, b in training if t == "captions"}) == 8  # every backbone QuARI trains on
    assert len({b for t, b in training if t == "uned"}) == 7  # Table 1b's
    for (trainset, backbone), got in training.items():
        assert sorted(got) == sorted(f"{c}/{p:04d}" for c in sets[trainset]
                                     for p in range(collection_jobs.get(c, 1))), (trainset, backbone)
    training_jobs = [res for rule, res in jobs if rule == "embed_training_part"]
    assert len(training_jobs) == sum(map(len, training.values())) == \
        8 * (1 + collection_jobs["cc12m"] + 1) + 7 * collection_jobs["uned"]
    assert all(res["gpu"] == "1" for res in training_jobs)
    downloads = [res for rule, res in jobs if rule == "locate_data_group"]
    # downloaded once, shared by backbones
    assert len(downloads) == yfcc_groups + mini_groups + collection_jobs["cc12m"]
    assert all(res.get("gpu", "0") == "0" for res in downloads)
    assembled = [res for rule, res in jobs if rule == "assemble_gallery"]
    assert len(assembled) == 7 + 7 + 5 and all(res.get("gpu", "0") == "0" for res in assembled)
    assembled = [res for rule, res in jobs if rule == "assemble_training_set"]
    assert len(assembled) == len(training) == 8 + 7
    assert all(res.get("gpu", "0") == "0" for res in assembled)
    assert not [rule for rule, _ in jobs if rule == "embed_training_set"]  # no single job left
    # Table 3a's database local descriptors: one GPU job per slice of the shortlist, one
    # CPU job writes the file the re-rankers read
    descriptors = [res for rule, res in jobs if rule == "extract_ilias_database_local_descriptors"]
    assert len(descriptors) == fan_out["local_descriptor_jobs"] > 1
    assert all(res["gpu"] == "1" for res in descriptors)
    merged = [res for rule, res in jobs if rule == "assemble_ilias_database_local_descriptors"]
    assert len(merged) == 1 and merged[0].get("gpu", "0") == "0"


def test_ci_slurm_profile_maps_every_gpu_request_to_nothing():
    profile = yaml.safe_load((PROFILES / "slurm-ci" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["slurm-status-command"] == "squeue"
    zeroed = {rule for rule, res in profile["set-resources"].items() if res.get("gpu") == 0}
    assert rules_running_a_network() <= zeroed, sorted(rules_running_a_network() - zeroed)


def test_every_rule_names_an_environment_a_node_can_build():
    """workflow/envs/quari.yaml: the pinned runtime packages of requirements.txt, without the
    editable install and the test / workflow tools (a node builds it with --sdm conda); datasets
    is only the tests' reference decoder."""
    env = yaml.safe_load((ROOT / "workflow/envs/quari.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert not [p for p in pip if p.startswith("-e") or p.startswith(".")]
    pins = dict(p.split("==") for p in pip)
    req = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    tools = {"pytest", "snakemake", "snakemake-executor-plugin-slurm", "datasets"}
    assert pins == {k: v for k, v in req.items() if k not in tools}
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = path.read_text()
        rules = len(re.findall(r"^\s*rule \w+:", text, re.M))
        assert rules == len(re.findall(r'^\s*conda:\n\s*"\.\./envs/quari\.yaml"', text, re.M)), path.name


def test_yfcc_groups_fetch_only_their_own_shards(server, tmp_path):
    """The listing job fetches checksums.txt only; a group's job fetches and verifies its own
    shards (against their sha256), nothing else."""
    import hashlib

    from quari.data import sources
    from quari.data.downloads import VerificationError
    base = f"http://127.0.0.1:{server.server_address[1]}/ilias_data"
    shards = {f"yfcc100m/yfcc100m_{n:06d}.tar": bytes([n]) * (1000 + n) for n in range(5)}
    lines = [f"{hashlib.sha256(b).hexdigest()} {base}/{name}" for name, b in shards.items()]
    server.files = {f"/ilias_data/{name}": b for name, b in shards.items()}
    server.files["/ilias_data/checksums.txt"] = ("\n".join(reversed(lines)) + "\n").encode()
    cfg = {"server_url": base, "yfcc_shards": 4}
    listing = sources.ilias_yfcc_listing(cfg, tmp_path, download=True)
    assert [e["name"] for e in listing] == sorted(shards)[:4]
    assert [path for path, _ in server.requests] == ["/ilias_data/checksums.txt"]
    group = sources.locate_ilias_yfcc(cfg, tmp_path, True, listing=listing[2:4])
    assert [Path(t).read_bytes() for t in group["distractor_tars"]] == \
        [shards[e["name"]] for e in listing[2:4]]
    assert sorted(path for path, _ in server.requests[1:]) == [
        f"/ilias_data/{e['name']}" for e in listing[2:4]]
    server.mode = "corrupt"
    with pytest.raises(RuntimeError, match="yfcc100m_000000.tar") as failed:
        sources.locate_ilias_yfcc(cfg, tmp_path, True, listing=listing[:1])
    assert isinstance(failed.value.__cause__, VerificationError)
    assert not (tmp_path / "ilias/server/yfcc100m/yfcc100m_000000.tar").exists()
    server.mode = "normal"
    # downloads off: the same listing from the files in place, missing ones named
    offline = sources.ilias_yfcc_listing(cfg, tmp_path, download=False)
    assert [e["sha256"] for e in offline] == [e["sha256"] for e in listing]
    from quari.data.downloads import MissingDataError
    with pytest.raises(MissingDataError, match="yfcc100m_000000.tar"):
        sources.locate_ilias_yfcc(cfg, tmp_path, False, listing=offline[:1])


# ----------------------------------------------------------------------------- a real SLURM


def slurm_available() -> str | None:
    """None when a SLURM controller answers and a node is up, else why not."""
    import shutil
    for tool in ("sbatch", "squeue", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (start one with: sudo bash .ci/start_slurm.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                               timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer: {err}"
    if "UP" not in ping.stdout:
        return f"no SLURM controller is up ({ping.stdout.strip() or ping.stderr.strip()})"
    if not any(s.startswith(("idle", "mix", "alloc")) for s in nodes.stdout.split()):
        return f"no SLURM node is up (sinfo: {nodes.stdout.strip()})"
    return None


CLUSTER_TARGETS = ["results/embeddings/ilias/tiny-siglip/gallery",
                   "results/embeddings/ilias_mini/tiny-siglip/gallery",
                   "results/embeddings/inquire/tiny-siglip/gallery",
                   "results/eval/ilias/tiny-siglip/identity.json"]


def squeue_jobs() -> dict[str, tuple[str, str]]:
    """``{SLURM job id: (state, comment)}`` of every job the controller still knows."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k"], capture_output=True,
                         text=True, check=True).stdout
    return {i: (state, comment) for i, state, comment in
            (line.split("|", 2) for line in out.splitlines() if line.strip())}


def submitted(output: str) -> dict[str, str]:
    """``{SLURM job id: rule}`` of the jobs a Snakemake run submitted (from its log)."""
    jobs = {}
    for match in re.finditer(r"Job \d+ has been submitted with SLURM jobid (\d+) "
                             r"\(log: [^)]*/slurm_logs/rule_(\w+?)/", output):
        jobs[match.group(1)] = match.group(2)
    return jobs


def executed_jobs(output: str) -> int:
    """The number of jobs a run executed, from the job-stats table it prints first."""
    match = re.search(r"^total\s+(\d+)$", output, re.M)
    assert match, output[-2000:]
    return int(match.group(1))


def untimed(result):
    """An evaluation result without its timings (seconds, ms_per_*), which differ between runs."""
    if isinstance(result, dict):
        return {k: untimed(v) for k, v in result.items()
                if k != "seconds" and not k.startswith("ms_per")}
    return result


def same_embedding_sets(a: Path, b: Path) -> None:
    import numpy as np

    from quari.store import load_embedding_set
    x, y = load_embedding_set(a), load_embedding_set(b)
    assert x.ids == y.ids and len(x.ids) > 0, (a, b)
    assert np.array_equal(np.asarray(x.embeddings), np.asarray(y.embeddings)), (a, b)


def single_job_training_set(config: Path, trainset: str, backbone: str, out: Path) -> dict:
    """What the one job per training set wrote before the fan-out: its collections read whole,
    held out and merged (collections.training_split), each side embedded in one go
    (embedding_jobs.embed_training_collection). Returns {side: folder}."""
    from quari.backbones import ilias_transform, load_backbone, model_transform
    from quari.data import collections, embedding_jobs, sources
    real = yaml.safe_load(config.read_text())["real"]
    names = real["training_sets"][trainset]
    files = [sources.locate_collection(c, real["collections"][c], real["data_root"], False)
             for c in names]
    train, valid, protocol = collections.training_split(names, files, real["collections"],
                                                        real["valid_fraction"])
    info, path = embedding_jobs.configured_backbone(backbone, real["models"])
    encoder = load_backbone(info, path=path, device="cpu")
    transform = ilias_transform(info) if protocol == "ilias" else model_transform(info)
    return {side: embedding_jobs.embed_training_collection(
                encoder, pairs, out / trainset / side, transform, f"{trainset}-{side}",
                meta={"protocol": protocol}, progress=False, **real["embedding"])
            for side, pairs in (("train", train), ("valid", valid))}


@pytest.fixture(scope="module")
def tiny_real_world(tmp_path_factory):
    """Generated official-format files, two tiny backbones and the config the cluster test runs."""
    from tests.builders import (make_collections, make_ilias, make_inquire, save_tiny_clip,
                                save_tiny_siglip, tiny_real_config)
    root = tmp_path_factory.mktemp("cluster")
    data, models = root / "data", root / "models"
    make_ilias(data / "ilias")
    inquire = make_inquire(data / "inquire")
    make_collections(data)
    save_tiny_clip(models / "clip")
    save_tiny_siglip(models / "siglip")
    cfg = tiny_real_config(data, models, inquire["precomputed"])
    cfg["evaluations"] = [{"benchmarks": ["ilias"], "backbones": ["tiny-siglip"],
                           "methods": ["identity", "quari"]}]
    config = root / "tiny-real.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return root, config


@pytest.mark.cluster
def test_real_data_dag_through_the_slurm_executor(tiny_real_world):
    """The tiny real-data DAG (fan-out included) through `snakemake --executor slurm` equals a
    local run, every job being a SLURM job; a part job cancelled with scancel is redone by a
    rerun, to the same outputs."""
    reason = slurm_available()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    root, config = tiny_real_world
    args = [*CLUSTER_TARGETS, "--configfile", str(config), "--replace-workflow-config"]
    # locally, also a method trained on a collection (QuARI; identity reads none), and the UnED
    # training set
    trained = "results/eval/ilias/tiny-siglip/quari.json"
    uned = "results/embeddings/uned/tiny-siglip/train"
    local = snakemake(root / "local", trained, uned, *args, "--max-threads", "1")
    assert local.returncode == 0, local.stderr[-5000:]
    # the training sets, assembled from parts (COCO one, CC12M one per tar, UnED three slices),
    # equal what the single job embedding each set whole wrote, row, id and label alike
    from tests.test_data_embedding_jobs import _same_collections
    for trainset in ("captions", "uned"):
        reference = single_job_training_set(config, trainset, "tiny-siglip", root / "single")
        for side in ("train", "valid"):
            _same_collections(reference[side],
                              root / "local/results/embeddings" / trainset / "tiny-siglip" / side)

    # editing one collection's max_images re-runs only what reads that collection: QuARI's
    # training set, its mined semi-positives, training and evaluation; not the galleries, not
    # identity's evaluation
    edited = yaml.safe_load(config.read_text())
    edited["real"]["collections"]["coco"]["max_images"] -= 1
    (root / "edited.yaml").write_text(yaml.safe_dump(edited))
    dry = snakemake(root / "local", *CLUSTER_TARGETS, trained, "--configfile",
                    str(root / "edited.yaml"), "--replace-workflow-config", "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    rerun = job_resources(dry.stdout + dry.stderr)
    assert {rule for rule, _ in rerun} == {"embed_training_part", "assemble_training_set",
                                           "mine_semipositives", "train_method", "evaluate"}, rerun
    assert sum(rule == "evaluate" for rule, _ in rerun) == 1  # QuARI's, not identity's
    assert sum(rule == "embed_training_part" for rule, _ in rerun) == 1  # COCO's; not CC12M's

    profile = ["--profile", str(PROFILES / "slurm-ci")]
    run = snakemake(root / "slurm", *args, *profile, cores=False, timeout=1500)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-5000:]
    jobs = submitted(log)
    # every job of the DAG went through sbatch, and SLURM ran each to completion
    assert len(jobs) == executed_jobs(log) > 20
    assert {"embed_gallery_part", "assemble_gallery", "locate_data_group", "evaluate"} <= set(jobs.values())
    queue = squeue_jobs()
    assert all(queue[j][0] == "COMPLETED" for j in jobs), {j: queue.get(j) for j in jobs}
    assert sum(r == "embed_gallery_part" for r in jobs.values()) == 1 + 2 + 2 + 2  # core, 2 YFCC, 2 mini, 2 pool

    # the fanned-out sets equal a local run's, row for row and id for id
    for target in CLUSTER_TARGETS[:3]:
        same_embedding_sets(root / "local" / target, root / "slurm" / target)
    import json
    metrics = [untimed(json.loads((root / w / CLUSTER_TARGETS[3]).read_text())["tasks"])
               for w in ("local", "slurm")]
    assert metrics[0] == metrics[1]  # everything but the timings

    # cancel a running part job; the rerun redoes it and ends with the same gallery
    import shutil
    import time
    gallery = root / "slurm" / CLUSTER_TARGETS[0]
    shutil.rmtree(gallery)
    shutil.rmtree(gallery.parent / "gallery-parts" / "yfcc-0001")
    before = set(squeue_jobs())
    cmd = [str(SNAKEMAKE), "--snakefile", str(ROOT / "Snakefile"), "--directory",
           str(root / "slurm"), CLUSTER_TARGETS[0], "--configfile", str(config),
           "--replace-workflow-config", *profile]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    cancelled, deadline = None, time.time() + 600
    while cancelled is None and time.time() < deadline and first.poll() is None:
        for job, (state, comment) in squeue_jobs().items():
            if job not in before and state == "RUNNING" and "embed_gallery_part" in comment:
                subprocess.run(["scancel", job], check=True)
                cancelled = job
        time.sleep(0.2)
    output = first.communicate(timeout=600)[0]
    assert cancelled, f"no part job seen running: {output[-3000:]}"
    assert first.returncode != 0 and not gallery.exists()  # the cancelled job failed the run
    assert squeue_jobs()[cancelled][0] == "CANCELLED"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    redone = submitted(again.stdout + again.stderr)
    assert sorted(redone.values()) == ["assemble_gallery", "embed_gallery_part"]
    same_embedding_sets(root / "local" / CLUSTER_TARGETS[0], gallery)


def test_cc12m_groups_list_once_and_locate_their_own_tars(tmp_path):
    """Downloads off: the listing job lists the collection's tars (a listing kept by an earlier
    download wins over what lies there), each group job finds only its own and names a
    missing one."""
    import json

    from quari.data import sources
    from quari.data.downloads import MissingDataError
    from quari.data.parts import even_slices
    root = tmp_path / "cc12m"
    for n in range(5):
        (root / f"cc12m-train-{n:04d}.tar").parent.mkdir(parents=True, exist_ok=True)
        (root / f"cc12m-train-{n:04d}.tar").write_bytes(b"x" * (n + 1))
    cfg = {"format": "webdataset", "pattern": "cc12m-train-*.tar", "max_shards": 4}
    names = sources.webdataset_listing("cc12m", cfg, tmp_path, download=False)
    assert names == [f"cc12m-train-{n:04d}.tar" for n in range(4)]
    groups = [names[a:b] for a, b in even_slices(len(names), 3)]
    assert [len(g) for g in groups] == [1, 1, 2]
    located = sources.locate_webdataset_group("cc12m", cfg, tmp_path, False, groups[2])
    assert located == {"format": "webdataset",
                       "tars": [str(root / n) for n in ("cc12m-train-0002.tar", "cc12m-train-0003.tar")]}
    (root / "cc12m-train-0003.tar").unlink()
    with pytest.raises(MissingDataError, match="cc12m-train-0003.tar"):
        sources.locate_webdataset_group("cc12m", cfg, tmp_path, False, groups[2])
    # a hub collection: the listing an earlier download kept, not a glob of what is there
    hub = {**cfg, "hf_repo": "pixparse/cc12m-wds", "max_shards": None}
    kept = sources._listing_path(root, hub["hf_repo"], hub["pattern"])
    kept.write_text(json.dumps({"files": ["cc12m-train-0001.tar", "cc12m-train-0003.tar"]}))
    assert sources.webdataset_listing("cc12m", hub, tmp_path, download=False) == [
        "cc12m-train-0001.tar", "cc12m-train-0003.tar"]
    with pytest.raises(MissingDataError, match="cc12m-train-0003.tar"):
        sources.locate_webdataset_group("cc12m", hub, tmp_path, False, ["cc12m-train-0003.tar"])
