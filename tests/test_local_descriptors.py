"""DINOv2 local descriptor extraction on a tiny random DINOv2 saved locally and reloaded through
from_pretrained: counts, shapes, norms, coordinates, the top-n selection against a brute-force
recomputation from the model's outputs (also through a random AMES detector saved in the
official checkpoint layout), resume (also of an interrupted merge), the skip list, and
re-ranking with the result; and the descriptor file itself: streamed writing against np.savez,
memory-mapped loading against np.load, files written before, truncated files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.local_features.rerankers import ChamferReranker
from baselines.local_features.descriptors import (DinoLocalExtractor, LocalDescriptorConfig,
                                     extract_local_descriptors, main)
from baselines.local_features.matching import (chamfer_similarity, load_local_descriptors,
                                  save_local_descriptors)
from quari.store import NpzFormatError
from tests.builders import PATCH, tiny_detector, tiny_dinov2

RESOLUTION = 32
#: (width, height) of the generated images: landscape, portrait (its short side ends mid-patch,
#: so some padded patches must be dropped) and square
SIZES = {"a": (40, 30), "b": (23, 50), "c": (64, 64), "d": (37, 21)}


def detector_equations(tokens, path):
    """(descriptors, saliency) of tokens [P, D] from the detector's equations: a pointwise linear
    map, batch norm with the running statistics, L2 normalisation; the saliency is
    softplus(w . relu(x) + b) of the normalised-by-batch-norm (not L2) features."""
    state = torch.load(path, weights_only=True)["state"]
    x = tokens @ state["conv1.weight"][:, :, 0, 0].T + state["conv1.bias"]
    x = (x - state["bn.running_mean"]) / torch.sqrt(state["bn.running_var"] + 1e-5) \
        * state["bn.weight"] + state["bn.bias"]
    logit = torch.relu(x) @ state["conv2.weight"][0, :, 0, 0] + state["conv2.bias"][0]
    return x / x.norm(dim=-1, keepdim=True), torch.log1p(torch.exp(logit))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    items = []
    for name, (w, h) in SIZES.items():
        # smooth random images, so that patch tokens differ in a structured way
        small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(root / f"{name}.jpg")
        items.append((name, str(root / f"{name}.jpg")))
    good = (root / "a.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated: fails to decode
    items.insert(2, ("broken", str(root / "broken.jpg")))
    return items


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def brute_force(model_dir, path, n, saliency, registers=0, detector=None):
    """Top-n patches of one image recomputed from the model's outputs with explicit loops."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    image = Image.open(path).convert("RGB")
    w0, h0 = image.size
    ratio = h0 / w0  # ILIAS's LargeSideResize: the short side truncated
    h = RESOLUTION if ratio > 1 else max(1, int(RESOLUTION * ratio))
    w = RESOLUTION if ratio <= 1 else max(1, int(RESOLUTION / ratio))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic",
                                        antialias=True).clamp(0, 1)[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean[:, None, None]) / std[:, None, None]
    rows, cols = -(-h // PATCH), -(-w // PATCH)
    padded = torch.zeros(3, rows * PATCH, cols * PATCH)
    padded[:, :h, :w] = x
    with torch.no_grad():
        out = model(pixel_values=padded[None], output_attentions=True)
    tokens = out.last_hidden_state[0, 1 + registers:]
    if saliency == "ames_detector":  # the detector's own descriptors, ranked by its score
        tokens, scores = detector_equations(tokens, detector)
    else:
        scores = (tokens.norm(dim=-1) if saliency == "norm"
                  else out.attentions[-1][0, :, 0, 1 + registers:].mean(0))
    candidates = []
    for r in range(rows):
        for c in range(cols):
            cx, cy = (c + 0.5) * PATCH, (r + 0.5) * PATCH
            if cx < w and cy < h:  # centre inside the image, not in the padding
                candidates.append((float(scores[r * cols + c]), r * cols + c, cx / w, cy / h))
    candidates.sort(key=lambda t: -t[0])
    top = candidates[:n]
    desc = torch.nn.functional.normalize(tokens[[t[1] for t in top]], dim=-1).numpy()
    xy = np.array([[t[2], t[3]] for t in top], dtype=np.float32)
    return desc, xy, len(candidates), (w0, h0)


@pytest.mark.parametrize("saliency,registers", [("norm", 0), ("cls_attention", 0), ("norm", 2),
                                                ("ames_detector", 2)])
def test_extraction_selects_the_top_n_patches(images, tmp_path, saliency, registers):
    model_dir = tiny_dinov2(tmp_path / "model", registers)
    detector = tiny_detector(tmp_path / "detector.pt") if saliency == "ames_detector" else None
    n = 40  # more than some images have: their count is the number of valid patches
    config = LocalDescriptorConfig(model=model_dir, num_descriptors=n, resolution=RESOLUTION,
                                   saliency=saliency, dtype="float32", detector=detector)
    extractor = DinoLocalExtractor(model_dir, saliency=saliency, detector=detector)
    out = tmp_path / "db.npz"
    got = extract_local_descriptors(extractor, images, out, config, batch_size=3, num_workers=0,
                                    progress=False)
    assert got.ids == ["a", "b", "c", "d"]  # the corrupt image is skipped, order kept
    assert got.descriptors.shape == (4, n, 32) and got.xy.shape == (4, n, 2)
    with np.load(out) as f:
        sizes = f["image_sizes"]
    paths = dict(images)
    for row, name in enumerate(got.ids):
        desc, xy = got.image(row)
        ref_desc, ref_xy, valid, size = brute_force(model_dir, paths[name], n, saliency, registers,
                                                    detector)
        assert len(desc) == min(n, valid)
        np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(xy, ref_xy, atol=1e-6)
        np.testing.assert_allclose(desc, ref_desc, atol=1e-4)
        assert tuple(sizes[row]) == size
        pixels = xy * sizes[row]
        assert (pixels > 0).all() and (pixels < sizes[row]).all()  # centres inside the image
        assert (got.descriptors[row, len(desc):] == 0).all()  # padding rows are empty
    assert min(got.counts) < n  # the small images really are short of patches
    skipped = (tmp_path / "db.npz.skipped.tsv").read_text().splitlines()
    assert skipped[0] == "id\treason" and skipped[1].startswith("broken\t")
    meta = json.loads((tmp_path / "db.npz.json").read_text())
    assert (meta["requested"], meta["extracted"], meta["skipped"]) == (5, 4, 1)
    assert not (tmp_path / "db.npz.parts").exists()


def test_batches_do_not_change_descriptors(images, model_dir, tmp_path):
    config = LocalDescriptorConfig(model=model_dir, num_descriptors=12, resolution=RESOLUTION)
    extractor = DinoLocalExtractor(model_dir)
    one = extract_local_descriptors(extractor, images, tmp_path / "one.npz", config, batch_size=1,
                                    num_workers=0, progress=False)
    many = extract_local_descriptors(extractor, images, tmp_path / "many.npz", config,
                                     batch_size=5, num_workers=0, progress=False)
    # float16 on disk, memory-mapped as stored; converted to float32 only when read in memory
    assert one.descriptors.dtype == np.float16 and isinstance(one.descriptors, np.memmap)
    assert load_local_descriptors(tmp_path / "one.npz", mmap=False).descriptors.dtype == np.float32
    np.testing.assert_allclose(np.asarray(one.descriptors, np.float32),
                               np.asarray(many.descriptors, np.float32), atol=2e-3)
    np.testing.assert_array_equal(one.xy, many.xy)


class Interrupt(BaseException):
    """Stands for a killed job (not an image error, which would only skip the image)."""


def test_an_interrupted_run_resumes_and_existing_files_are_kept(images, model_dir, tmp_path):
    config = LocalDescriptorConfig(model=model_dir, num_descriptors=8, resolution=RESOLUTION)
    extractor = DinoLocalExtractor(model_dir)
    clean = extract_local_descriptors(extractor, images, tmp_path / "clean.npz", config,
                                      part_images=2, num_workers=0, progress=False)

    def killed():
        raise Interrupt

    out = tmp_path / "resumed.npz"
    with pytest.raises(Interrupt):
        extract_local_descriptors(extractor, images[:4] + [("d", killed)], out, config,
                                  part_images=2, num_workers=0, progress=False)
    parts = sorted(p.name for p in (tmp_path / "resumed.npz.parts").glob("part-*.npz"))
    assert parts == ["part-00000.npz", "part-00001.npz"] and not out.exists()
    calls = []
    counted = [(i, (lambda s=s: calls.append(s) or s)) for i, s in images]
    resumed = extract_local_descriptors(extractor, counted, out, config, part_images=2,
                                        num_workers=0, progress=False)
    assert calls == [images[4][1]]  # only the last part was extracted again
    assert resumed.ids == clean.ids
    np.testing.assert_array_equal(resumed.descriptors, clean.descriptors)
    np.testing.assert_array_equal(resumed.counts, clean.counts)
    # the same job again returns the file; another job never overwrites it
    before = out.read_bytes()
    assert extract_local_descriptors(extractor, images, out, config, part_images=2,
                                     num_workers=0, progress=False).ids == clean.ids
    with pytest.raises(FileExistsError):
        extract_local_descriptors(extractor, images[:2], out, config, part_images=2,
                                  num_workers=0, progress=False)
    assert out.read_bytes() == before


def test_cli_output_reranks_with_chamfer(images, model_dir, tmp_path):
    paths = dict(images)
    db_tsv = tmp_path / "db.tsv"
    db_tsv.write_text("".join(f"{i}\t{p}\n" for i, p in images))
    # query 0 is a copy of database image "c"; query 1 is image "a"
    q_tsv = tmp_path / "q.tsv"
    q_tsv.write_text(f"q0\t{paths['c']}\nq1\t{paths['a']}\n")
    common = ["--model", model_dir, "--resolution", str(RESOLUTION), "--num-descriptors", "10",
              "--workers", "0", "--device", "cpu"]
    assert main(["--images", str(db_tsv), "--out", str(tmp_path / "db.npz"), *common]) == 0
    assert main(["--images", str(q_tsv), "--out", str(tmp_path / "q.npz"), *common]) == 0
    db, q = load_local_descriptors(tmp_path / "db.npz"), load_local_descriptors(tmp_path / "q.npz")
    gallery_ids = ["d", "c", "a", "b"]
    method = ChamferReranker(device="cpu").fit(
        None, local_descriptors=tmp_path / "db.npz", query_local_descriptors=tmp_path / "q.npz",
        gallery_ids=gallery_ids)
    gallery = np.zeros((4, 8), dtype=np.float32)
    shortlist = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    scores = method.rerank(gallery[:2], gallery, shortlist, query_ids=["q0", "q1"])
    for b, qid in enumerate(["q0", "q1"]):
        for j, row in enumerate(shortlist[b]):
            ref = chamfer_similarity(q.image(q.rows([qid])[0])[0],
                                     db.image(db.rows([gallery_ids[row]])[0])[0])
            assert scores[b, j].item() == pytest.approx(ref, abs=1e-5)
    # a query identical to a database image matches it exactly: Chamfer 1, ranked first
    assert scores[0, 1].item() == pytest.approx(1.0, abs=1e-3) and scores[0].argmax() == 1
    assert scores[1].argmax() == 1 and scores[1, 1].item() == pytest.approx(1.0, abs=1e-3)  # row 2 = "a"


def test_rejects_a_model_that_is_not_dinov2(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=8, patch_size=4)
                    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not DINOv2"):
        DinoLocalExtractor(str(tmp_path))
    with pytest.raises(ValueError, match="saliency"):
        DinoLocalExtractor(str(tmp_path), saliency="entropy")


def test_detector_must_fit_the_model(model_dir, tmp_path):
    with pytest.raises(ValueError, match="16-dimensional"):  # the tiny DINOv2 gives 32
        DinoLocalExtractor(model_dir, saliency="ames_detector",
                           detector=tiny_detector(tmp_path / "narrow.pt", dim=16))
    with pytest.raises(ValueError, match="ames_detector"):  # a detector with another saliency
        DinoLocalExtractor(model_dir, saliency="norm", detector=tiny_detector(tmp_path / "d.pt"))


@pytest.mark.gpu
def test_cuda_half_precision_matches_cpu(images, model_dir, tmp_path):
    config = LocalDescriptorConfig(model=model_dir, num_descriptors=12, resolution=RESOLUTION,
                                   dtype="float32")
    cpu = extract_local_descriptors(DinoLocalExtractor(model_dir), images, tmp_path / "cpu.npz",
                                    config, num_workers=0, progress=False)
    gpu = extract_local_descriptors(DinoLocalExtractor(model_dir, device="cuda"), images,
                                    tmp_path / "gpu.npz", config, num_workers=0, progress=False)
    assert gpu.ids == cpu.ids
    np.testing.assert_array_equal(gpu.counts, cpu.counts)
    for row in range(len(cpu.ids)):  # half precision may swap near-tied patches
        sim = gpu.image(row)[0] @ cpu.image(row)[0].T
        assert (sim.max(axis=1) > 0.99).mean() > 0.8


# -- the descriptor file ---------------------------------------------------------------------------

def descriptor_arrays(rng, images, n=6, dim=5):
    return {"ids": [f"img{i}" for i in range(images)],
            "descriptors": rng.standard_normal((images, n, dim)).astype(np.float16),
            "xy": rng.random((images, n, 2)).astype(np.float32),
            "counts": rng.integers(0, n + 1, images).astype(np.int64)}


@pytest.mark.parametrize("images", [0, 1, 4])
def test_saved_file_is_what_np_savez_writes_and_loads_memory_mapped(tmp_path, images):
    rng = np.random.default_rng(images)
    arrays = descriptor_arrays(rng, images)
    sizes = rng.integers(1, 999, (images, 2))
    save_local_descriptors(tmp_path / "d.npz", arrays["ids"], arrays["descriptors"], arrays["xy"],
                           arrays["counts"], extra={"image_sizes": sizes})
    np.savez(tmp_path / "ref.npz", ids=np.asarray(arrays["ids"], dtype=str),
             counts=arrays["counts"], image_sizes=sizes, descriptors=arrays["descriptors"],
             xy=arrays["xy"])
    with np.load(tmp_path / "d.npz") as got, np.load(tmp_path / "ref.npz") as ref:
        assert sorted(got.files) == sorted(ref.files)
        for key in ref.files:
            assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape
            np.testing.assert_array_equal(got[key], ref[key])
    mapped = load_local_descriptors(tmp_path / "d.npz")
    in_memory = load_local_descriptors(tmp_path / "d.npz", mmap=False)
    assert mapped.ids == in_memory.ids == arrays["ids"]
    assert mapped.descriptors.dtype == np.float16 and in_memory.descriptors.dtype == np.float32
    for array in (mapped.descriptors, mapped.xy):
        assert not array.flags.writeable
        if images:  # an empty array has nothing to map
            assert isinstance(array, np.memmap)
    np.testing.assert_array_equal(mapped.descriptors, arrays["descriptors"])
    np.testing.assert_array_equal(in_memory.descriptors, arrays["descriptors"].astype(np.float32))
    np.testing.assert_array_equal(mapped.xy, arrays["xy"])
    np.testing.assert_array_equal(mapped.counts, arrays["counts"])
    if images:  # gather: copies of any rows, any order, repeated, trimmed to a width
        rows = np.array([images - 1, 0, images - 1])
        desc, xy, counts = mapped.gather(rows, width=4)
        assert not isinstance(desc, np.memmap) and desc.dtype == np.float16
        np.testing.assert_array_equal(desc, arrays["descriptors"][rows, :4])
        np.testing.assert_array_equal(xy, arrays["xy"][rows, :4])
        np.testing.assert_array_equal(counts, arrays["counts"][rows])
        longest = max(1, int(arrays["counts"][rows].max()))  # default width: padding cut off
        desc, xy, _ = mapped.gather(rows)
        np.testing.assert_array_equal(desc, arrays["descriptors"][rows, :longest])
        np.testing.assert_array_equal(xy, arrays["xy"][rows, :longest])


def test_files_written_before_still_load(tmp_path, caplog):
    """The previous writer's np.savez files memory-map; compressed ones are read into memory,
    with a note in the log; both give the arrays np.load gives."""
    import logging

    arrays = descriptor_arrays(np.random.default_rng(1), 3)
    for name, save in (("old.npz", np.savez), ("compressed.npz", np.savez_compressed)):
        save(tmp_path / name, ids=np.asarray(arrays["ids"]), descriptors=arrays["descriptors"],
             xy=arrays["xy"], counts=arrays["counts"])
        with caplog.at_level(logging.INFO, logger="quari.store"):
            caplog.clear()
            got = load_local_descriptors(tmp_path / name)
        assert got.ids == arrays["ids"]
        np.testing.assert_array_equal(got.descriptors, arrays["descriptors"])
        np.testing.assert_array_equal(got.xy, arrays["xy"])
        assert got.descriptors.dtype == np.float16
        compressed = name == "compressed.npz"
        assert isinstance(got.descriptors, np.memmap) != compressed
        assert ("cannot be memory-mapped" in caplog.text) == compressed


def test_a_truncated_file_is_named(tmp_path):
    arrays = descriptor_arrays(np.random.default_rng(2), 4)
    save_local_descriptors(tmp_path / "db.npz", arrays["ids"], arrays["descriptors"],
                           arrays["xy"], arrays["counts"])
    data = (tmp_path / "db.npz").read_bytes()
    (tmp_path / "db.npz").write_bytes(data[:-40])  # cut inside the zip's directory
    for mmap in (True, False):
        with pytest.raises(NpzFormatError, match=r"db\.npz is not a complete \.npz"):
            load_local_descriptors(tmp_path / "db.npz", mmap=mmap)
    np.savez(tmp_path / "short.npz", ids=np.asarray(arrays["ids"]), counts=arrays["counts"],
             descriptors=arrays["descriptors"][:3], xy=arrays["xy"])
    with pytest.raises(NpzFormatError, match="short.npz.*4 ids, 3 descriptor rows"):
        load_local_descriptors(tmp_path / "short.npz")


def test_an_interrupted_merge_keeps_the_parts_and_resumes(images, model_dir, tmp_path,
                                                          monkeypatch):
    """The merge reads the parts one at a time; if it dies, the parts stay and no output
    appears; the rerun only merges (nothing is extracted again)."""
    import baselines.local_features.descriptors as module

    config = LocalDescriptorConfig(model=model_dir, num_descriptors=8, resolution=RESOLUTION)
    extractor = DinoLocalExtractor(model_dir)
    clean = extract_local_descriptors(extractor, images, tmp_path / "clean.npz", config,
                                      part_images=2, num_workers=0, progress=False)
    read_parts = []
    real = module.load_npz_array

    def dies_on_the_third_part(path, name, mmap=True):
        read_parts.append((path.name, name))
        if len(read_parts) == 4:  # [header of part 0], descriptors of parts 0, 1, 2
            raise Interrupt
        return real(path, name, mmap)

    monkeypatch.setattr(module, "load_npz_array", dies_on_the_third_part)
    out = tmp_path / "out.npz"
    with pytest.raises(Interrupt):
        extract_local_descriptors(extractor, images, out, config, part_images=2, num_workers=0,
                                  progress=False)
    assert read_parts == [("part-00000.npz", "descriptors"), ("part-00000.npz", "descriptors"),
                          ("part-00001.npz", "descriptors"), ("part-00002.npz", "descriptors")]
    assert not out.exists() and not list(tmp_path.glob(".out.npz.*"))  # no temporary left
    assert len(list((tmp_path / "out.npz.parts").glob("part-*.npz"))) == 3
    monkeypatch.setattr(module, "load_npz_array", real)
    calls = []
    counted = [(i, (lambda s=s: calls.append(s) or s)) for i, s in images]
    resumed = extract_local_descriptors(extractor, counted, out, config, part_images=2,
                                        num_workers=0, progress=False)
    assert calls == [] and not (tmp_path / "out.npz.parts").exists()
    assert isinstance(resumed.descriptors, np.memmap) and resumed.ids == clean.ids
    for key in ("descriptors", "xy", "counts"):
        np.testing.assert_array_equal(getattr(resumed, key), getattr(clean, key))
    with np.load(out) as merged, np.load(tmp_path / "clean.npz") as reference:
        np.testing.assert_array_equal(merged["image_sizes"], reference["image_sizes"])


def test_descriptors_extracted_in_parts_equal_one_job(images, model_dir, tmp_path):
    """Three jobs over consecutive slices of the ids (the unreadable image in one of them),
    assembled: the same ids, descriptors, positions, sizes, record and skip list as one job
    over all; a part of other ids is refused before anything is written."""
    from baselines.local_features.descriptors import assemble_local_descriptors
    from quari.data.parts import PartError, even_slices
    from quari.store import read_npz_arrays
    config = LocalDescriptorConfig(model=model_dir, num_descriptors=8, resolution=RESOLUTION)
    extractor = DinoLocalExtractor(model_dir)
    opts = dict(batch_size=2, part_images=2, num_workers=0, progress=False)
    one = extract_local_descriptors(extractor, images, tmp_path / "one.npz", config, **opts)
    parts = []
    for k, (start, stop) in enumerate(even_slices(len(images), 3)):
        parts.append(tmp_path / "parts" / f"{k:04d}.npz")
        extract_local_descriptors(extractor, images[start:stop], parts[-1], config, **opts)
    ids = [i for i, _ in images]
    got = assemble_local_descriptors(parts, ids, tmp_path / "many.npz", config, part_images=2)
    assert got.ids == one.ids and "broken" not in got.ids
    np.testing.assert_array_equal(got.counts, one.counts)
    np.testing.assert_array_equal(got.xy, one.xy)
    np.testing.assert_allclose(np.asarray(got.descriptors, np.float32),
                               np.asarray(one.descriptors, np.float32), atol=2e-3)
    sizes = [read_npz_arrays(tmp_path / f, ["image_sizes"])["image_sizes"]
             for f in ("one.npz", "many.npz")]
    np.testing.assert_array_equal(*sizes)
    for suffix in (".json", ".skipped.tsv"):  # the same record (fingerprint of all ids) and list
        assert (tmp_path / f"many.npz{suffix}").read_text() == \
            (tmp_path / f"one.npz{suffix}").read_text()
    with pytest.raises(PartError, match="other images"):
        assemble_local_descriptors(parts[::-1], ids, tmp_path / "bad.npz", config, part_images=2)
    with pytest.raises(PartError, match="other images"):  # another configuration
        assemble_local_descriptors(parts, ids, tmp_path / "bad.npz",
                                   LocalDescriptorConfig(model=model_dir, num_descriptors=6,
                                                         resolution=RESOLUTION), part_images=2)
    assert not list(tmp_path.glob("bad.npz*"))
