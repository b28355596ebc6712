"""The 1-D coordinates along ``sample``: the sample keys and every metadata column.

Numbers and times go through xarray (its CF time encoding). Text goes straight
from Arrow into Zarr's variable-length UTF-8 (``vlen-utf8`` then ``zstd``, the
codecs zarr-python itself picks for strings, then ``crc32c`` as every chunk of the
cube), one column at a time: a million
footprints never become Python objects in the client (measured at 1.1 M samples:
writing them through xarray peaked at +1.2 GB for the footprint column alone).
Each coordinate is one chunk (docs/CUBE.md).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xarray as xr

from . import columns, schema, sharding, source, store
from . import metadata as meta
from .plan import ConversionPlan

STRING_ZSTD_LEVEL = 0  # zarr-python's default compressor for strings

Coordinate = tuple[str, np.ndarray | pa.Array, dict[str, Any], dict[str, Any]]


class MetadataSource(Protocol):
    """What the writer needs of the metadata: its schema and one column at a time
    (a ``pyarrow.Table`` or :class:`nasar_zarr.corpus.MetadataColumns`)."""

    @property
    def schema(self) -> pa.Schema: ...

    def column(self, name: str) -> Any: ...


def vlen_utf8(values: pa.Array) -> pa.Buffer:
    """``values`` (text without nulls) in Zarr's ``vlen-utf8`` encoding.

    The encoding is the item count, then each item's byte length and bytes, all
    little-endian uint32 lengths. Built by Arrow in one pass: each item gets its
    length as a 4-byte prefix (the first item also the count), and the joined
    items' data buffer is the encoding.

    Examples
    --------
    >>> bytes(vlen_utf8(pa.array(["ab", "c"])))
    b'\\x02\\x00\\x00\\x00\\x02\\x00\\x00\\x00ab\\x01\\x00\\x00\\x00c'
    """
    text = values.cast(pa.large_binary())
    n = len(text)
    if text.null_count:
        raise ValueError("vlen_utf8: the values hold nulls")
    if n == 0:
        return pa.py_buffer(np.zeros(1, dtype="<u4").tobytes())
    header = np.empty(n + 1, dtype="<u4")  # count, then each item's length
    header[0] = n
    header[1:] = pc.binary_length(text).to_numpy(zero_copy_only=False)
    offsets = np.arange(1, n + 2, dtype=np.int64) * 4
    offsets[0] = 0
    prefix = pa.Array.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(header)]
    )
    joined = pc.binary_join_element_wise(prefix, text, pa.scalar(b"", pa.large_binary()))
    ends = np.frombuffer(joined.buffers()[1], dtype=np.int64)[joined.offset :][[0, n]]
    return joined.buffers()[2][int(ends[0]) : int(ends[1])]


def sample_coordinate(plan: ConversionPlan) -> Coordinate:
    """The ``sample`` dimension coordinate: the WebDataset keys in release order."""
    attrs = {"long_name": "WebDataset sample key"}
    return schema.SAMPLE_DIM, plan.sample_keys, attrs, {}


def coordinate_names(names: Iterable[str]) -> list[str]:
    """The coordinate of each metadata column: its name, prefixed where it is taken."""
    reserved = {
        schema.SAMPLE_DIM,
        *schema.LABELS,
        *schema.VARIABLES,
        schema.STATUS,
        schema.RTC_PRESENT,
    }
    return [f"metadata_{name}" if name in reserved else name for name in names]


def metadata_coordinates(plan: ConversionPlan, table: MetadataSource) -> Iterator[Coordinate]:
    """Each metadata column as ``(coordinate name, values, attrs, encoding)``, one at a time.

    One at a time so that a writer holds one column's values, not the whole table's.
    """
    n = plan.n_samples
    names = table.schema.names
    roles = columns.recognise(names, **dict(plan.options.columns))
    for coord, name in zip(coordinate_names(names), names, strict=True):
        values, attrs = meta.encode_column(name, table.column(name))
        attrs = {**columns.cf_attrs(name, values, roles), **attrs, "nasar_column": name}
        enc: dict[str, Any] = {
            "chunks": (max(n, 1),),
            "compressors": sharding.unsharded_compressors(),
        }
        if isinstance(values, pa.Array):
            pass  # text: written by write_text
        elif attrs[meta.ENCODING_ATTR] == "timestamp":
            unit = {
                "s": "seconds",
                "ms": "milliseconds",
                "us": "microseconds",
                "ns": "nanoseconds",
            }[np.datetime_data(values.dtype)[0]]
            enc.update(units=f"{unit} since 1970-01-01", dtype="int64")
        elif values.dtype.kind == "f":
            enc["_FillValue"] = np.nan
        yield coord, values, attrs, enc


def write_all(plan: ConversionPlan, metadata: MetadataSource) -> None:
    """Write (or rewrite) every 1-D coordinate of ``plan``'s cube: the sample keys,
    then the metadata columns one at a time."""
    write_coordinates(
        plan.dest,
        plan.storage_options,
        itertools.chain([sample_coordinate(plan)], metadata_coordinates(plan, metadata)),
    )


def write_coordinates(
    dest: str, storage_options: Mapping[str, Any] | None, coordinates: Iterable[Coordinate]
) -> None:
    """Write 1-D coordinates along ``sample`` into the store, one Zarr array each,
    replacing any of the same name."""
    zstore = store.zarr_store(dest, storage_options)
    group = store.open_group(dest, storage_options, mode="r+", use_consolidated=False)
    for coord, values, attrs, enc in coordinates:
        if coord in group:
            del group[coord]
        if isinstance(values, pa.Array):
            write_text(dest, storage_options, coord, values, attrs, group=group)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xr.Dataset(coords={coord: (schema.SAMPLE_DIM, values, attrs)}).to_zarr(
                zstore, mode="a", zarr_format=3, consolidated=False, encoding={coord: enc}
            )


def write_text(
    dest: str,
    storage_options: Mapping[str, Any] | None,
    name: str,
    values: pa.Array,
    attrs: Mapping[str, Any],
    *,
    group: Any = None,
) -> None:
    """A text coordinate as one ``vlen-utf8`` + ``zstd`` + ``crc32c`` chunk, encoded from
    Arrow (``group``: the store's root group, when the caller has it open)."""
    from numcodecs import Zstd
    from zarr.codecs import Crc32cCodec, ZstdCodec

    n = len(values)
    if group is None:
        group = store.open_group(dest, storage_options, mode="r+", use_consolidated=False)
    array = group.create_array(
        name,
        shape=(n,),
        chunks=(max(n, 1),),
        dtype=str,
        fill_value="",
        compressors=[ZstdCodec(level=STRING_ZSTD_LEVEL, checksum=False), Crc32cCodec()],
        dimension_names=(schema.SAMPLE_DIM,),
        attributes=dict(attrs),
        overwrite=True,
    )
    if n == 0:
        return
    chunk = sharding.with_checksum(Zstd(level=STRING_ZSTD_LEVEL).encode(vlen_utf8(values)))
    fs, root = store.filesystem(dest, storage_options)
    path = f"{root}/{name}/{array.metadata.encode_chunk_key((0,))}"
    if not source.is_remote(dest):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, bytes(chunk))
