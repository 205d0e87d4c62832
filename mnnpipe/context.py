"""What a running step may touch, handed to it by the runner: its inputs (fetched and digested),
a scratch folder, an output folder, its own checkpoints and the shared caches.

Steps reach storage only through this object: they never import the runner or pick store
prefixes themselves, so where checkpoints and caches live is decided here, once.
"""

from __future__ import annotations

import os
import posixpath
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

from .errors import InputError
from .store import fetch, join, local_path, sha256_path, store_for

if TYPE_CHECKING:
    from torch import nn

    from .data import Dataset
    from .specs import DatasetRef, ModelRef

T = TypeVar("T")

#: Folder under a step's output where resumable checkpoints live until the output is published.
CHECKPOINTS = "checkpoints"


def cache_root(output: str) -> str:
    """Where caches live: MNNPIPE_CACHE_URI, else `s3://<output bucket>/.mnnpipe-cache` for S3
    outputs, else the user's cache folder. The run cache's index and every step's shared cache
    (e.g. distill's teacher logits) are under it."""
    root = os.environ.get("MNNPIPE_CACHE_URI")
    if root:
        return root
    if output.startswith("s3://"):
        return f"s3://{output[5:].split('/', 1)[0]}/.mnnpipe-cache"
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnnpipe" / "index")


@dataclass(frozen=True)
class SharedCache:
    """Files computed from content, shared by every run that writes under the same cache root
    (one key, one file). A reader must check what it gets: an entry may be torn or foreign."""

    root: str
    scratch: Path

    def uri(self, name: str) -> str:
        return join(self.root, name)

    def get(self, name: str) -> Path | None:
        """The entry's local copy, or None when there is none."""
        uri = self.uri(name)
        store = store_for(uri)
        if not store.exists(uri):
            return None
        local = self.scratch / name
        try:
            store.get(uri, local)
        except InputError:
            return None  # deleted between exists and get
        return local

    def put(self, local: Path, name: str) -> None:
        uri = self.uri(name)
        store_for(uri).put(local, uri)


@dataclass(frozen=True)
class Checkpoints:
    """A step's resumable state under `<output>/checkpoints/`, outside the manifest. The runner
    deletes them once the output is published; a crash before that keeps them for the rerun."""

    prefix: str
    scratch: Path

    def save(self, local: Path) -> str:
        uri = join(self.prefix, local.name)
        store_for(uri).put(local, uri)
        return uri

    def names(self) -> list[str]:
        return [posixpath.basename(u) for u in store_for(self.prefix).list(self.prefix)]

    def fetch(self, name: str) -> Path | None:
        """A local copy of checkpoint `name`, or None when it has gone."""
        uri = join(self.prefix, name)
        local = self.scratch / name
        try:
            store_for(uri).get(uri, local)
        except InputError:
            return None
        return local

    def delete(self, name: str) -> None:
        uri = join(self.prefix, name)
        store_for(uri).delete(uri)

    def clear(self) -> None:
        for name in self.names():
            self.delete(name)
        if "://" not in self.prefix or self.prefix.startswith("file://"):
            folder = local_path(self.prefix)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


@dataclass
class StepContext:
    """What a step may touch: its inputs (fetched and digested), a scratch folder, an output folder."""

    workdir: Path
    outdir: Path
    quiet: bool = False
    input_paths: dict[str, Path] = field(default_factory=dict)
    input_digests: dict[str, str] = field(default_factory=dict)
    #: Where the step publishes (its spec's `output`): checkpoints and caches are placed from it.
    output: str = ""
    #: The content key of this work (spec with input digests, engine versions), set by the runner
    #: before `run`: a checkpoint written under one key never resumes another's work.
    key: str = ""

    def local(self, uri: str) -> Path:
        """The local path of an input URI (fetched once, verified against its manifest if any)."""
        if uri not in self.input_paths:
            path = fetch(uri, self.workdir / "inputs")
            self.input_paths[uri] = path
            self.input_digests[uri] = sha256_path(path)
        return self.input_paths[uri]

    def dataset_path(self, ref: DatasetRef) -> Path | None:
        """The fetched file or folder of a dataset input; None for a built-in set (sklearn-digits)."""
        return self.local(ref.uri) if ref.uri else None

    def dataset(self, ref: DatasetRef, field: str, *, labelled: str | None = None) -> Dataset:
        """The dataset the spec's `field` names, fetched, split and preprocessed (mnnpipe.data).

        `labelled`: why the step needs labels (e.g. "distillation needs labelled data"); when
        given, a dataset without labels is an InputError naming `field` and saying so."""
        from .data import load_dataset

        data = load_dataset(ref, self.dataset_path(ref))
        if labelled and data.y is None:
            raise InputError(f"{field}: {ref.uri or ref.format} has no labels; {labelled}")
        return data

    def torch_model(self, ref: ModelRef) -> nn.Module:
        """The torch model `ref` names, fetched and loaded in eval mode (mnnpipe.modelio.load_torch)."""
        from .modelio import load_torch

        return load_torch(ref, self.local(ref.uri))

    def child(self, name: str) -> StepContext:
        """A context for running another step's `run` inside this one (its outdir is scratch, not
        published), sharing the inputs already fetched and digested."""
        work = self.scratch(name)
        sub = StepContext(
            workdir=work, outdir=work / "out", quiet=True, input_paths=self.input_paths,
            input_digests=self.input_digests, output=self.output, key=self.key,
        )  # fmt: skip
        sub.outdir.mkdir(exist_ok=True)
        return sub

    def scratch(self, name: str) -> Path:
        path = self.workdir / "scratch" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def checkpoints(self) -> Checkpoints:
        if not self.output:
            raise AssertionError("checkpoints need the context's output (set by the runner)")
        return Checkpoints(join(self.output.rstrip("/"), CHECKPOINTS), self.scratch("checkpoints"))

    def shared_cache(self, namespace: str) -> SharedCache:
        """Content-keyed files shared across runs (e.g. distill's teacher logits)."""
        return SharedCache(join(cache_root(self.output), namespace), self.scratch(f"cache-{namespace}"))

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """A progress bar on stderr for long loops; silent with --quiet or when not a terminal."""
        from tqdm import tqdm

        disable = self.quiet or not sys.stderr.isatty()
        yield from tqdm(iterable, desc=desc, total=total, disable=disable, leave=False)
