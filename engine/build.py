"""``build_store``: run a frozen model over every split and stream its probe-site activations
into a feature store.

This module decides *what* is built: it checks the arguments (:class:`CaptureOptions`),
resolves the splits, the probe sites and their reductions, writes or checks the store's
metadata and arrays (:mod:`engine.format`), takes the store's lock, and hands the rows to
:func:`engine._writer.write_rows` in this process, or to the Dask workers
(:func:`engine.schedule.build_on`). A resumed build refuses another model, data or config,
and ``repair=True`` first rewrites exactly the chunks ``verify`` finds damaged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import zarr
from torch import nn

from . import _lock, _zarr, schedule
from . import format as fmt
from ._data import check_targets, extra_labels, resolve_splits, sample_digest
from ._fingerprint import differences, model_fingerprint
from ._outputs import selectors
from ._tokens import keep_mask, token_offsets
from ._writer import CaptureJob, write_rows
from .capture import Capture, Runner, Site, discover_sites, select_modules
from .errors import (
    InvalidArgumentError,
    StoreCorruptedError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
)
from .options import CaptureOptions
from .reduce import resolve_reductions
from .store import Store

__all__ = ["build_store"]


def build_store(
    model: nn.Module,
    data: Any,
    path: str | os.PathLike = "probes.zarr",
    *,
    layers: Any = "auto",
    sites: Sequence[str] | str = ("output",),
    rows: str = "items",
    select: Mapping[str, int | str] | None = None,
    reduce: str | Mapping[str, str] = "auto",
    max_features: int = 8192,
    dtype: str = "float16",
    labels: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    valid_size: int | float | str = "auto",
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    autocast: str | None = None,
    channels_last: bool = False,
    block_bytes: int = 64 << 20,
    compressor: str = "lz4",
    nan_policy: str = "raise",
    resume: bool = True,
    overwrite: bool = False,
    repair: bool = False,
    progress: bool = True,
    client: Any = None,
) -> Store:
    """Capture the activations of ``layers`` of ``model`` on ``data`` into a store at ``path``.

    Args:
        model: a frozen ``nn.Module``; run in eval mode under ``torch.inference_mode``, its
            training flags, device and memory format restored afterwards.
        data: a Dataset or DataLoader of ``(input, int label)``, or a mapping of split name
            to one. A single dataset, or a mapping without ``"valid"``, gives ``valid_size``
            rows of its ``"train"`` split (seeded by ``seed``) to a ``"valid"`` split. An
            input may be a dict of tensors, run as ``model(**input)`` (tokenised text:
            :class:`engine.datasets.TextDataset`).
        layers: ``"auto"`` (the model input and every conv, linear, activation and pooling
            module), or names, globs and module types; see :func:`engine.capture.select_modules`.
        sites: ``"output"`` and/or ``"input"`` side of each selected module.
        rows: ``"items"`` (a row per dataset item) or ``"tokens"``: a row per labelled token
            of every sequence (items of dict inputs with an ``attention_mask`` and (T,)
            labels, -1 for a token not to store: ``engine.TextDataset(...,
            token_labels=...)``), each layer (a (T, D) sequence) stored token by token;
            ``<split>/index`` and ``<split>/position`` give each row's item and position.
            A sequence is never split between splits. See ``docs/capture.md``.
        select: which tensor of a layer's structured output to probe, ``{module name or
            glob: int position or str key}``. Without an entry, a tuple or list gives its
            first floating-point tensor, a dict or ``ModelOutput`` its
            ``last_hidden_state`` (else ``hidden_states``, else its first floating-point
            tensor); see ``docs/capture.md``.
        reduce: ``"none"``, ``"pool"``, ``"pool:HxW"``, ``"subsample:K"``,
            ``"tokens:mean"`` (``:max``, ``:cls``, ``:first``, ``:last``: a token sequence,
            padding excluded) or ``"auto"`` (token sequences: ``"tokens:mean"``; else by
            ``max_features``), or a dict of layer key / module name / glob -> spec
            (unlisted layers: ``"auto"``); see :mod:`engine.reduce`.
        dtype: storage dtype, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        labels: extra label arrays, ``{name: callable(y) -> labels or array indexed by the
            source dataset's item index}``, stored beside ``y``.
        num_classes: number of classes of ``y``; default ``len(dataset.classes)`` when the
            dataset has ``classes``, else the largest label + 1.
        batch_size: rows per forward pass (default: the DataLoader's, else 256).
        device: ``"auto"`` (the model's, else CUDA when available), ``"cpu"``, ``"cuda:1"``.
        autocast: ``"bfloat16"`` / ``"float16"`` runs the forward under ``torch.autocast``.
        channels_last: run conv nets in channels-last memory format.
        block_bytes: host bytes of one block of rows (all layers); two blocks are in flight.
        nan_policy: ``"raise"`` on NaN / inf activations (naming layer and row) or ``"ignore"``.
        resume: continue an interrupted build at ``path`` made with the same model, data and
            config (anything else is refused, naming the difference). A complete store is
            returned as it is: nothing is written.
        repair: with ``resume``, first verify the committed rows (:meth:`Store.verify`) and
            rewrite exactly the chunks that are missing, truncated or fail their checksum,
            recomputing only the blocks of rows that hold them (every other file is left
            untouched); then finish the build as ``resume`` does. Problems other than
            chunks (a wrong shape, bad metadata) raise :class:`StoreCorruptedError`.
        overwrite: replace an existing store at ``path``; never deletes anything that is not
            a probe-engine store.
        client: a ``distributed.Client`` (e.g. :func:`engine.cluster`): the rows are cut into
            whole blocks, one task each, and the workers run the model on their blocks and
            write them into the store at ``path``, which all of them must reach (a shared
            filesystem). The store equals a single-process build's at the same torch thread
            count (docs/scaling.md).

    The options from ``sites`` to ``nan_policy`` are :class:`engine.options.CaptureOptions`.
    Only one process may write a store: a second ``build_store`` on the same path while one
    runs raises :class:`StoreLockedError` naming the holder's pid and host. The lock dies
    with its process (see ``docs/reliability.md``); a Dask build holds it in the driver.

    Returns:
        The :class:`Store`, complete.
    """
    options = CaptureOptions(
        sites=sites, rows=rows, select=select, reduce=reduce, max_features=max_features,
        dtype=dtype, num_classes=num_classes, valid_size=valid_size, seed=seed,
        batch_size=batch_size,
        device=device, autocast=autocast, channels_last=channels_last,
        block_bytes=block_bytes, compressor=compressor, nan_policy=nan_policy)
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, not a "
                                   f"{type(model).__name__}")
    path = str(path)
    splits = resolve_splits(data, valid_size=options.valid_size, seed=options.seed)
    check_targets(splits, options.num_classes)
    extras = extra_labels(labels, splits)
    batch = options.batch_size or splits[0].batch_size or 256
    _check_path(path, fmt.describe_path(path), resume=resume, overwrite=overwrite)
    ok, checked = fmt.writable(path)
    if not ok:
        raise StoreError(f"cannot write to {checked} (read-only or no permission); choose a "
                         f"writable path for the store")

    tokens = options.rows == "tokens"
    if tokens and extras:
        raise InvalidArgumentError("labels= (extra label sets, one per item) does not apply "
                                   "to rows='tokens': the rows' labels are the tokens' own")
    # rows="tokens": count every split's stored tokens first (tokenising, not the model)
    offsets = {s.name: token_offsets(s) for s in splits} if tokens else {}
    first = splits[0]
    probe = first.fetch(list(range(min(2, first.rows))))
    modules = select_modules(model, layers, probe.inputs)
    chosen = selectors(options.select or {}, modules)
    runner = Runner(model, options.device, options.autocast, options.channels_last)
    with _lock.hold(path), runner:
        existing = fmt.describe_path(path)  # again, now that no other writer can change it
        _check_path(path, existing, resume=resume, overwrite=overwrite)
        found = discover_sites(model, modules, options.sites,
                               lambda: runner.forward(probe.inputs), chosen)
        reductions = resolve_reductions(_token_specs(options.reduce, found) if tokens else
                                        options.reduce, found,
                                        max_features=options.max_features, seed=options.seed)
        job = CaptureJob(options, batch, splits, [site for site, _ in found], reductions, extras,
                         chosen, offsets, token_ids=tokens and isinstance(
                             probe.inputs, Mapping) and "input_ids" in probe.inputs)
        # the first rows once through every reduction (an attention mask that does not fit
        # a layer's tokens, a spec that does not fit its values) before anything is written
        dry = Capture(runner, job.sites, reductions, sides=options.sites, select=chosen)
        with dry.hooked():
            dry.batch(probe.inputs, mask=keep_mask(probe.inputs, probe.labels, first.name, 0)
                      if tokens else None)
        wanted = _metadata(model, job, found)
        if existing and overwrite:
            fmt.remove_store(path)
            existing = None
        if existing:
            group = _reopen(path, wanted)  # a refusal leaves the store as it is
        # temporary files and empty folders of killed writers: only a lock holder may
        # remove them
        _zarr.remove_temp_files(path)
        if not existing:
            group = fmt.create_root(path, wanted)
        indices = {k: r.indices for k, r in reductions.items() if r.indices is not None}
        fmt.ensure_arrays(group, wanted, indices, repair=repair)
        meta = fmt.read_meta(group, path)  # what is committed so far
        for split in job.splits:  # token rows: the counts of the store's creation
            if meta.splits[split.name].rows != job.rows(split):
                raise StoreMismatchError(
                    f"split {split.name!r} of the store at {path} has "
                    f"{meta.splits[split.name].rows} rows, the data now gives "
                    f"{job.rows(split)}; the data changed: pass overwrite=True to rebuild")
        if repair and existing:
            _repair(runner, path, group, meta, job, progress=progress)
        if client is not None:
            schedule.build_on(client, path, group, meta, model, job, progress=progress)
        else:
            schedule.remove_markers(path)  # of an unfinished Dask build: redone here
            write_rows(runner, job, group, meta, path=path, progress=progress)
        if meta.dataset.num_classes is None and meta.complete:
            fmt.infer_num_classes(group, meta)  # writes only what is not there
    return Store(path)


def _token_specs(reduce, found: list[tuple[Site, tuple]]) -> dict[str, str]:
    """rows="tokens": every layer stores each token's vector whole (``tokens:each``)."""
    if reduce not in ("auto", "tokens:each"):
        raise InvalidArgumentError(
            f"reduce={reduce!r} does not apply to rows='tokens': each token's features are "
            f"stored whole; leave reduce='auto'")
    return {site.key: "tokens:each" for site, _ in found}


def _check_path(path: str, existing: str | None, *, resume: bool, overwrite: bool) -> None:
    if existing is not None and existing != "a probe-engine store":
        raise StoreError(f"{path} holds {existing}, not a probe-engine store; choose another "
                         f"path (nothing there was changed)")
    if existing and not overwrite and not resume:
        raise StoreExistsError(f"a store already exists at {path}; pass resume=True to finish "
                               f"or reuse it, overwrite=True to replace it, or another path")


def _metadata(model: nn.Module, job: CaptureJob, found: list[tuple[Site, tuple]]
              ) -> fmt.StoreMeta:
    """The metadata of a new store for ``job``: nothing committed."""
    opts, splits = job.options, job.splits
    row_bytes = sum(r.dim for r in job.reductions.values()) * fmt.DTYPES[opts.dtype][0].itemsize
    # token rows come by the batch in any number: blocks are whole multiples of 64 rows
    block_rows = fmt.block_rows_for(row_bytes, 64 if job.offsets else job.batch_size,
                                    opts.block_bytes, max(job.rows(s) for s in splits))
    classes = getattr(splits[0].dataset, "classes", None)
    num_classes = opts.num_classes
    if num_classes is None and classes is not None:
        num_classes = len(classes)
    fingerprint = model_fingerprint(model)
    return fmt.StoreMeta(
        model=fmt.ModelMeta(fingerprint["class"], fingerprint["parameters"],
                            fingerprint["digest"]),
        dataset=fmt.DatasetMeta(
            type=type(splits[0].dataset).__name__, split_seed=opts.seed,
            splits={s.name: fmt.SourceMeta(s.source, s.rows, sample_digest(s)) for s in splits},
            num_classes=num_classes,
            classes=list(map(str, classes)) if classes is not None else None),
        layers=[fmt.LayerMeta(site.key, site.module, site.side, site.call,
                              tuple(int(n) for n in shape), job.reductions[site.key].dim,
                              job.reductions[site.key].spec, job.selector(site))
                for site, shape in found],
        splits={s.name: fmt.SplitMeta(job.rows(s)) for s in splits},
        config=opts.store_config(batch_size=job.batch_size, block_rows=block_rows,
                                 labels=job.label_names),
    )


def _reopen(path: str, wanted: fmt.StoreMeta) -> zarr.Group:
    """The existing store's root, once its model, data and config are found to be
    ``wanted``'s; else :class:`StoreMismatchError` naming every difference."""
    group = fmt.open_root(path, write=True)
    fmt.check_version(dict(group.attrs[fmt.ATTR]), path, resume=True)
    stored = fmt.read_meta(group, path)
    diff = differences(stored.identity(), wanted.identity())
    if diff:
        raise StoreMismatchError(
            f"the store at {path} was built with another model, data or config, so it cannot "
            f"be resumed:\n  " + "\n  ".join(diff[:12])
            + ("\n  ..." if len(diff) > 12 else "")
            + "\nPass overwrite=True to rebuild it, or choose another path."
        )
    return group


def _repair(runner: Runner, path: str, group: zarr.Group, meta: fmt.StoreMeta, job: CaptureJob,
            *, progress: bool) -> list[tuple[str, int]]:
    """Verify the committed rows and rewrite exactly the chunks that are missing or do not
    decode, recomputing only the blocks of rows that hold them; returns those chunks."""
    report = Store(path).verify()
    other = report.other_problems()
    if other:
        raise StoreCorruptedError(
            f"the store at {path} has problems a chunk repair cannot fix:\n  "
            + "\n  ".join(other[:12])
            + "\nRebuild it with overwrite=True (or build into another path)")
    if not report.bad_chunks:
        return []
    block_rows = meta.config.block_rows
    only: dict[str, set[int]] = {}
    blocks: dict[str, set[int]] = {}
    for array, c in report.bad_chunks:
        only.setdefault(array, set()).add(c)
        step = group[array].chunks[0]
        blocks.setdefault(fmt.split_of(array), set()).add(c * step // block_rows * block_rows)
    for split in job.splits:
        for b0 in sorted(blocks.get(split.name, ())):
            b1 = min(b0 + block_rows, job.rows(split))
            write_rows(runner, job, group, meta, path=path, ranges={split.name: (b0, b1)},
                       on_commit=lambda block: None, only=only, progress=progress)
    still = []
    for array, chunks in only.items():
        arr, step = group[array], group[array].chunks[0]
        for c in sorted(chunks):
            try:
                arr[c * step : min((c + 1) * step, arr.shape[0])]
            except (ValueError, RuntimeError, OSError):
                still.append(fmt.chunk_key(array, c, arr.ndim))
    if still:
        raise StoreCorruptedError(f"{path}: chunks {still} still do not decode after being "
                                  f"rewritten; check the disk, then rebuild with "
                                  f"overwrite=True")
    return report.bad_chunks

