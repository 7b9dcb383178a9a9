"""The one interface every retrieval method implements: QuARI and each baseline.

A method is fitted on a training collection, then ranks a gallery for a batch of queries. It is
split into ``prepare`` (per-query work done once: QuARI's hypernetwork, a static projection of
the query) and ``score`` (queries against a chunk of gallery rows), so that the harness streams a
gallery of any size in chunks and times every method the same way. Search and shortlist
re-ranking are built on those two. Like scikit-learn estimators, ``__init__`` only stores
hyperparameters, ``fit`` returns ``self`` and learned state ends in ``_``.

Methods that need more than (query, gallery rows), such as query expansion over the gallery or
local-feature matching, override ``search``/``rerank`` directly.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import pkgutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from quari import scoring
from quari.devices import resolve_device
from quari.scoring import merge_topk, read_rows
from quari.store import TrainingCollection, atomic_write_json

log = logging.getLogger(__name__)

#: where methods are found: QuARI's own module, and every module of the ``baselines`` package
METHOD_MODULES = ("quari.quari_method",)
METHOD_PACKAGES = ("baselines",)
#: more places to search, separated by commas (the workflow sets it from the config key
#: ``method_packages``): methods of your own, kept outside this repository. Each is an importable
#: package or module name, or the path of a module file (``.py``) or of a package folder, which
#: is imported from its parent folder
METHOD_PACKAGES_ENV = "QUARI_METHOD_PACKAGES"


def as_tensor(x, device: torch.device | str = "cpu") -> torch.Tensor:
    """A float32 tensor on ``device`` from a numpy array, memmap or tensor."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def shortlist_rows(gallery, shortlist: np.ndarray, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
    """Gallery rows at ``shortlist`` (row indices [B, K]) as a float32 tensor [B, K, E] on
    ``device``: one fancy-indexing gather, which also works on memory-mapped arrays and
    :class:`quari.store.ShardedRows`."""
    shortlist = np.asarray(shortlist)
    if isinstance(gallery, torch.Tensor):
        return as_tensor(gallery[torch.from_numpy(shortlist)], device)
    return as_tensor(gallery[shortlist], device)


class RetrievalMethod(ABC):
    """Base class of all methods. Subclasses set ``name`` and implement ``prepare`` and ``score``.

    Besides that, a method *declares* what it needs and where it applies, as the class attributes
    below; the workflow (which inputs a job gets, which benchmarks and query types it is run on,
    which settings it is given), the evaluation and the tables read them, and never a method's
    name. The defaults fit a method trained on a training collection of embeddings only.
    """

    name: ClassVar[str] = ""
    #: what the tables call this method (default: ``name``); ``{param}`` fields are filled from the
    #: method's parameters ("α-QE (n={neighbours})"), see :meth:`display_label`
    label: ClassVar[str] = ""
    #: False for methods with nothing to learn (fit is a no-op): their training job only records
    #: their settings, and asks a cluster for no GPU
    trainable: ClassVar[bool] = True
    #: False when ``fit`` needs no training collection (``train``/``valid`` are None): then none
    #: is embedded for it
    uses_training_data: ClassVar[bool] = True
    #: what else ``fit`` receives, each as the keyword argument of the same name, prepared by the
    #: workflow (``workflow/rules/common.smk``, ``SIDE_INPUTS``): ``semipositives`` (mined from the
    #: training collection), ``oracle_file`` (the synthetic world's true subspaces),
    #: ``local_descriptors`` / ``query_local_descriptors`` (DINOv2 descriptors of ILIAS images),
    #: ``gallery_images`` / ``query_texts`` (INQUIRE-Rerank's candidate images and query texts),
    #: ``backbone`` (the backbone's registry entry, :class:`quari.backbones.BackboneInfo`)
    side_inputs: ClassVar[tuple[str, ...]] = ()
    #: the benchmarks it can run on (None: every one); a method whose side inputs are one
    #: benchmark's files runs on that benchmark only
    benchmarks: ClassVar[tuple[str, ...] | None] = None
    #: the query types it ranks for ("image", "text"): an ILIAS task of another type is skipped
    query_types: ClassVar[tuple[str, ...]] = ("image", "text")
    #: keys of the configuration's ``quari:`` block (QuARI's model and training recipe) that are
    #: this method's default parameters; its own config entry overrides them
    shared_settings: ClassVar[tuple[str, ...]] = ()
    #: parameters that are mappings, and the class or dataclass that receives each (their keys and
    #: types are checked when the configuration is loaded)
    nested_params: ClassVar[dict[str, type]] = {}
    #: True for a re-ranking method in the paper's sense (its Table 3): the tables show its
    #: re-ranking of a shortlist only, never its full-gallery search (implied by reranker_only)
    reranker: ClassVar[bool] = False
    #: True for the backbone's own ranking, unadapted: the tables call its rows "backbone" and,
    #: re-ranking, "initial ranking" (what every re-ranker starts from), beside the best possible
    #: re-ranking of its shortlist
    is_backbone: ClassVar[bool] = False
    #: True for methods that can only re-rank a given shortlist (``search`` raises
    #: NotImplementedError), such as local-feature matching, which needs each candidate's id
    reranker_only: ClassVar[bool] = False
    #: False when a row's score depends on the other rows ranked with it (query expansion from the
    #: top of the ranking): then ``search`` is not ``score`` sorted, nor ``rerank`` a slice of it
    scores_rows_independently: ClassVar[bool] = True
    #: memory (MB) its evaluation job asks of a cluster (a VLM holds a model of 13-34B weights)
    evaluation_mem_mb: ClassVar[int] = 32000
    #: rough cost of ``fit`` relative to other methods' (0: nothing to fit); the workflow starts
    #: the costliest trainings first (their job priority), so that a few cores finish sooner
    fit_cost: ClassVar[int] = 1

    def __init__(self, **params: Any):
        self.params = dict(params)
        self.device = resolve_device(params.get("device"))

    @classmethod
    def check_settings(cls, params: dict) -> None:
        """Raise TypeError or ValueError for settings this method refuses (called when the
        configuration is loaded, with its entry merged over its ``shared_settings``); the default
        builds the method on the CPU."""
        cls(**params, device="cpu")

    @classmethod
    def check_backbone(cls, backbone) -> None:
        """Raise ValueError when this method cannot run on ``backbone`` (a
        :class:`quari.backbones.BackboneInfo`; asked for methods whose side inputs include
        ``backbone``). The default accepts every backbone."""

    def display_label(self) -> str:
        """This method's name in the tables: its class's ``label`` with its parameters filled
        in, else its ``name``."""
        return self.label.format(**self.params) if self.label else self.name

    def model_size(self) -> str:
        """The size of this method's model, as the tables print it beside the row's name when it
        is not the paper's (a method with no model of a size to tell: "")."""
        return ""

    # -- learning -------------------------------------------------------------------------
    def fit(self, train: TrainingCollection, valid: TrainingCollection | None = None,
            workdir: str | os.PathLike | None = None, **context: Any) -> "RetrievalMethod":
        """Learn from a training collection; ``workdir`` may hold checkpoints. Returns self."""
        return self

    # -- ranking --------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, queries: torch.Tensor, query_ids: Sequence[str] | None = None) -> Any:
        """Per-query state for ``score`` (queries: [B, E] float32 on ``self.device``).

        ``query_ids`` lets a method look up side information it was given at fit time (the
        query's text for a vision-language re-ranker, the true category for the oracle).
        """

    @abstractmethod
    def score(self, state: Any, rows: torch.Tensor) -> torch.Tensor:
        """Scores [B, n] of the prepared queries against gallery rows [n, E] (higher is better)."""

    def score_candidates(self, state: Any, queries: torch.Tensor, candidates: torch.Tensor,
                         query_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Scores [B, K] of query b against its own candidates[b] ([B, K, E]).

        The default prepares each query alone; methods with a batched form override it.
        """
        out = []
        for b in range(queries.shape[0]):
            ids = None if query_ids is None else query_ids[b:b + 1]
            out.append(self.score(self.prepare(queries[b:b + 1], ids), candidates[b])[0])
        return torch.stack(out)

    def search(self, queries, gallery, k: int, chunk_rows: int = 65536,
               query_ids: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, row indices) of every query over the whole gallery, streamed in chunks."""
        q = as_tensor(queries, self.device)
        n = len(gallery)
        k = min(k, n)
        with torch.no_grad():
            state = self.prepare(q, query_ids)
            best_s = torch.empty((q.shape[0], 0), device=self.device)
            best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=self.device)
            for start in range(0, n, chunk_rows):
                rows = read_rows(gallery, start, min(start + chunk_rows, n), self.device,
                                 torch.float32)
                s = self.score(state, rows)
                idx = torch.arange(start, start + rows.shape[0], device=self.device).expand_as(s)
                best_s, best_i = merge_topk(best_s, best_i, s, idx, k)
        return best_s.cpu(), best_i.cpu()

    def rerank(self, queries, gallery, shortlist: np.ndarray,
               query_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Scores [B, K] of each query's shortlist (row indices [B, K] into the gallery)."""
        q = as_tensor(queries, self.device)
        candidates = shortlist_rows(gallery, shortlist, self.device)
        with torch.no_grad():
            return self.score_candidates(self.prepare(q, query_ids), q, candidates, query_ids).cpu()

    def check_gallery_ids(self, gallery) -> None:
        """For re-rankers that look candidates up by id: the ids set by ``set_gallery`` (in
        ``gallery_ids_``) must exist and match the gallery's row count."""
        ids = getattr(self, "gallery_ids_", None)
        if ids is None:
            raise RuntimeError(f"{self.name} does not know the gallery ids: pass gallery_ids to "
                               "fit or call set_gallery")
        if len(gallery) != len(ids):
            raise ValueError(f"gallery has {len(gallery)} rows but {len(ids)} gallery ids were set")

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Save hyperparameters (``method.json``) and learned state (``save_state``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_state(directory)
        params = {k: v for k, v in self.params.items() if k != "device"}
        atomic_write_json(directory / "method.json", {"name": self.name, "params": params})

    def save_state(self, directory: Path) -> None:
        """Write learned state into ``directory`` (nothing for stateless methods)."""

    def load_state(self, directory: Path) -> None:
        """Read what ``save_state`` wrote."""

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None) -> "RetrievalMethod":
        directory = Path(directory)
        info = json.loads((directory / "method.json").read_text())
        if info["name"] != cls.name:
            raise ValueError(f"{directory} holds method {info['name']!r}, not {cls.name!r}")
        method = cls(**info["params"], device=device)
        method.load_state(directory)
        return method


class StaticProjectionMethod(RetrievalMethod):
    """A method whose queries and gallery rows are both mapped by one fixed function ``embed``.

    Cosine similarity in the mapped space. The identity baseline and static linear adaptation
    are of this kind.
    """

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def prepare(self, queries: torch.Tensor, query_ids=None) -> torch.Tensor:
        return torch.nn.functional.normalize(self.embed(queries), dim=-1)

    def score(self, state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return state @ torch.nn.functional.normalize(self.embed(rows), dim=-1).T

    def score_candidates(self, state, queries, candidates, query_ids=None):
        mapped = torch.nn.functional.normalize(self.embed(candidates), dim=-1)
        return torch.einsum("be,bke->bk", state, mapped)


class TransformMethod(RetrievalMethod):
    """A method that maps each query to a :class:`quari.transform.QueryTransform` (QuARI, the
    oracle): the gallery is scored in the query's own adapted space with the factored form."""

    def transform(self, queries: torch.Tensor, query_ids: Sequence[str] | None = None):
        raise NotImplementedError

    def prepare(self, queries: torch.Tensor, query_ids: Sequence[str] | None = None):
        return self.transform(queries, query_ids).detach()

    def score(self, state, rows: torch.Tensor) -> torch.Tensor:
        return scoring.scores(state, rows)

    def score_candidates(self, state, queries, candidates, query_ids=None):
        return scoring.candidate_scores(state, candidates)

    def search(self, queries, gallery, k: int, chunk_rows: int = 65536,
               query_ids: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over the whole gallery with :func:`quari.scoring.topk`: the factored streaming
        search, pruned (exact) for identity-anchored maps."""
        q = as_tensor(queries, self.device)
        with torch.no_grad():
            state = self.prepare(q, query_ids)
        s, i = scoring.topk(state, gallery, min(k, len(gallery)), chunk_rows=chunk_rows,
                            device=self.device)
        return s.cpu(), i.cpu()


# -- the registry: every method found by name ----------------------------------------------------
_BROKEN: dict[str, str] = {}


def extra_method_packages() -> list[str]:
    """The packages (or single modules) named in ``$QUARI_METHOD_PACKAGES``."""
    return [p.strip() for p in os.environ.get(METHOD_PACKAGES_ENV, "").split(",") if p.strip()]


def _is_path(entry: str) -> bool:
    return os.sep in entry or "/" in entry or entry.endswith(".py")


def with_method_packages(entries: Sequence[str]) -> str:
    """``$QUARI_METHOD_PACKAGES`` with ``entries`` added (paths made absolute, so that a process
    started elsewhere finds them too)."""
    added = [str(Path(e).resolve()) if _is_path(e) else e for e in entries]
    return ",".join(dict.fromkeys([*extra_method_packages(), *added]))


def _importable(entry: str) -> str:
    """The module name of a ``$QUARI_METHOD_PACKAGES`` entry; a path's parent folder goes on
    ``sys.path``."""
    if not _is_path(entry):
        return entry
    path = Path(entry).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{METHOD_PACKAGES_ENV}: {entry} does not exist")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return path.stem if path.suffix == ".py" else path.name


def _method_modules() -> list[str]:
    """QuARI's module and every module under the method packages, those of
    ``$QUARI_METHOD_PACKAGES`` included (sub-packages included, names starting with ``_``
    skipped; a name there may also be a single module)."""
    names = list(METHOD_MODULES)
    for package_name in (*METHOD_PACKAGES, *map(_importable, extra_method_packages())):
        package = importlib.import_module(package_name)
        if not hasattr(package, "__path__"):  # a single module
            names.append(package_name)
            continue
        names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{package_name}.")
                  if not m.name.rsplit(".", 1)[-1].startswith("_")]
    return names


def _discover() -> dict[str, type[RetrievalMethod]]:
    """Every subclass of :class:`RetrievalMethod` with a ``name``, by name. A module whose optional
    dependency is missing is skipped with a warning (it disables that method, not the harness)."""
    found: dict[str, type[RetrievalMethod]] = {}
    for module_name in _method_modules():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # an optional dependency of that one method is missing
            _BROKEN[module_name] = str(err)
            log.warning("method module %s unavailable: %s", module_name, err)
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, RetrievalMethod) and obj.name and obj.__module__ == module.__name__:
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two methods are named {obj.name!r}: "
                                       f"{found[obj.name].__module__} and {module_name}")
                found[obj.name] = obj
    return found


def available_methods() -> list[str]:
    """Names of every registered method."""
    return sorted(_discover())


def get_method(name: str) -> type[RetrievalMethod]:
    """The method class called ``name``; an unknown name lists what exists."""
    methods = _discover()
    if name not in methods:
        hint = "".join(f"\n  {m}: {e}" for m, e in _BROKEN.items())
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}"
                       + (f"\nunavailable modules:{hint}" if hint else ""))
    return methods[name]
