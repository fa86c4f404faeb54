"""Shards: expand what a user writes into shard URLs, split them into data slots, read one.

Accepted forms (a string, or a list of strings, each expanded in turn):
- brace patterns, `shards-{00000..00009}.tar` (the `braceexpand` package webdataset uses);
- local globs, `/data/cc12m/*.tar` (sorted, so every rank sees the same order);
- plain local paths (checked up front: missing ones end in one error naming them);
- `pipe:<command>` and URLs with a scheme webdataset's `gopen` opens (http, https, gs, ...),
  passed through unchecked, since only the reader can tell whether they open.

Slots. Every reader of the job is one data slot: num_slots = world_size * max(num_workers, 1),
slot = rank * max(num_workers, 1) + worker_id. Each epoch permutes the shard list with an RNG
seeded by (seed, epoch), identically on every rank, and deals it out:
- len(shards) >= num_slots, every shard a local .tar and at most BALANCE_MAX_SHARDS of them
  (`shard_sizes`: sample keys counted from the tar headers, cached per path, mtime and size):
  whole shards, balanced by samples. Largest first (ties: the epoch's order), each shard goes to
  the slot with the fewest samples so far (ties: fewer shards, then the lower slot); each slot
  reads its shards in the epoch's order. Per pass any two slots differ by at most the largest
  shard's sample count; equal shards give order[s::num_slots]. Deterministic from (sizes, seed,
  epoch), so every rank and a resumed run deal alike;
- otherwise (pipe:/URL shards cannot be sized without reading them; at thousands of shards
  the counts even out and a header scan per shard per worker would cost): slot s reads
  order[s::num_slots], whole shards;
- fewer shards than slots: every slot reads every shard (in the epoch's order) and keeps only
  the samples whose running index i within the shard has i % num_slots == s. Correct (disjoint
  and complete within an epoch) but every slot reads all the bytes; write more shards than
  slots for real runs.

Reading (`iter_shard`): tar members come in order; consecutive members sharing a key form one
sample. Local uncompressed `.tar` files are read with random access (`local_tar_members`: each
member's data in one read, 3-4x faster than a stream for ~300 KB members such as cached text
embeddings); everything else (pipe:/URL shards, compressed tars) goes through webdataset's
`gopen` + `tar_file_iterator`, so it behaves as in webdataset. A shard failure is reported once, by reason: "unreadable_shard" (cannot be
opened, or not a tar), "truncated_tar" (breaks after its first member header: the samples
before are kept, the sample being assembled is dropped unless the broken member already belongs
to the next sample, the rest of the shard is unreachable). Python's tarfile reads a tar cut at a
member boundary as a shorter, valid tar; that case cannot be told apart and is not counted.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import heapq
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import braceexpand
import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from sgm.data.decode import BAD_SAMPLE_REASONS, BadSampleCounter

# Schemes webdataset 1.0.2's gopen can open (gopen_schemes, plus file:).
OPENABLE_SCHEMES = ("file", "pipe", "http", "https", "sftp", "ftps", "scp", "gs", "htgs", "hf", "ais")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_GLOB_CHARS = re.compile(r"[*?\[]")
LOADER_BAD_REASONS: tuple[str, ...] = BAD_SAMPLE_REASONS + (
    "truncated_tar",  # a shard ends (or breaks) inside a member
    "unreadable_shard",  # a shard cannot be opened or is not a tar
    "missing_image",  # no jpg/jpeg/png/webp member
    "missing_caption",  # no txt member
    "bad_caption",  # txt is not UTF-8
    "bad_json",  # json unparsable, not an object, or a non-positive original size
    "duplicate_member",  # two members with the same key and extension
    "too_small",  # original size below min_size (a filter, not a defect)
)
_PERMUTATION_DOMAIN = 2  # separates this RNG stream from the stream's others (see stream.py)


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard URLs in order: braces expanded, local globs sorted, missing local files refused.

    Raises ValueError for an empty result, an unopenable scheme, a glob with no match, or local
    paths that do not exist (all of them named in one message).
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"shards must be a string or a list of strings, got {shards!r}")
    urls: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern.strip()):
            scheme = _scheme(item)
            if scheme not in (None, "file"):
                if scheme not in OPENABLE_SCHEMES:
                    raise ValueError(
                        f"shard {item!r}: webdataset cannot open {scheme}:// URLs directly. "
                        f"Stream it through a command instead, e.g. 'pipe:aws s3 cp {item} -'."
                    )
                urls.append(item)
                continue
            path = item[len("file://") :] if scheme == "file" else item
            if _GLOB_CHARS.search(path):
                matches = sorted(glob.glob(os.path.expanduser(path)))
                if not matches:
                    raise ValueError(f"shard pattern {item!r} matches no file. Check the path and the pattern.")
                urls.extend(matches)
            elif not os.path.isfile(os.path.expanduser(path)):
                missing.append(item)
            else:
                urls.append(item)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} shard file(s) do not exist: {shown}. Fix the shard path or pattern "
            "(brace ranges like shards-{00000..00009}.tar are expanded), or build the shards first."
        )
    if not urls:
        raise ValueError(f"shard list {shards!r} is empty. Give at least one .tar shard.")
    return urls


def _scheme(item: str) -> str | None:
    match = _SCHEME.match(item)
    if match is None or len(match.group(1)) == 1:  # "C:" is a drive letter, not a scheme
        return None
    if match.group(1).lower() != "pipe" and not item[match.end() :].startswith("//"):
        return None  # "name:with:colons.tar" is a local file
    return match.group(1).lower()


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of shard indices; identical on every rank and worker."""
    rng = np.random.default_rng([_PERMUTATION_DOMAIN, seed % (1 << 64), epoch])
    return [int(i) for i in rng.permutation(num_shards)]


def slot_shards(
    num_shards: int, seed: int, epoch: int, slot: int, num_slots: int, sizes: Sequence[int] | None = None
) -> tuple[list[int], bool]:
    """(shard indices slot `slot` reads in `epoch`, in order; whether it must stride samples).

    With stride True the slot reads every shard and keeps samples with index % num_slots == slot.
    `sizes` (samples per shard, from `shard_sizes`) balances whole shards by samples; None deals
    them by count.
    """
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} out of range for {num_slots} slots")
    order = epoch_order(num_shards, seed, epoch)
    if num_shards < num_slots:
        return order, True
    if sizes is None:
        return order[slot::num_slots], False
    if len(sizes) != num_shards:
        raise ValueError(f"{len(sizes)} shard sizes for {num_shards} shards")
    return balanced_split(order, sizes, num_slots)[slot], False


def balanced_split(order: Sequence[int], sizes: Sequence[int], num_slots: int) -> list[list[int]]:
    """Each slot's shards, read in `order`: largest shard first (ties: earlier in `order`), each to
    the slot with the fewest samples (ties: fewer shards, lower slot). Greedy, so max - min of the
    slots' samples <= max(sizes)."""
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    heap = [(0, 0, slot) for slot in range(num_slots)]
    for shard in sorted(order, key=lambda shard: -sizes[shard]):  # stable: ties keep the epoch's order
        samples, count, slot = heapq.heappop(heap)
        slots[slot].append(shard)
        heapq.heappush(heap, (samples + sizes[shard], count + 1, slot))
    position = {shard: index for index, shard in enumerate(order)}
    return [sorted(shards, key=position.__getitem__) for shards in slots]


BALANCE_MAX_SHARDS = 256  # above this the count split evens out, and sizing costs a scan per worker


def shard_sizes(urls: Sequence[str]) -> list[int] | None:
    """Samples per shard (distinct consecutive keys in the tar headers) when every shard is a local
    .tar and there are at most BALANCE_MAX_SHARDS; else None. Unreadable parts count as empty:
    the sizes only weigh the split, and they are the same on every rank (the same files)."""
    paths = [local_tar_path(url) for url in urls]
    if len(paths) > BALANCE_MAX_SHARDS or any(path is None for path in paths):
        return None
    sizes = []
    for path in paths:
        try:
            stat = os.stat(path)  # type: ignore[arg-type]
        except OSError:
            sizes.append(0)
            continue
        sizes.append(_count_samples(path, stat.st_mtime_ns, stat.st_size))
    return sizes


@functools.lru_cache(maxsize=4 * BALANCE_MAX_SHARDS)
def _count_samples(path: str, mtime_ns: int, size: int) -> int:
    """Sample keys in a local tar, from its headers only (mtime and size key the cache)."""
    count = 0
    with contextlib.suppress(Exception), open(path, "rb") as file:  # a weight only: keep what was counted
        for _ in tar_sample_keys(file):
            count += 1
    return count


def tar_sample_keys(file: Any) -> Iterator[str]:
    """The sample keys of an open local tar in order, from its member headers alone (no data read)."""
    last = None
    for name in _member_names(file):
        prefix = base_plus_ext(name)[0]
        if prefix is not None and prefix != last:
            last = prefix
            yield prefix


def shard_name(url: str) -> str:
    """The file name of a shard path or URL (in `pipe:...`, of its last argument naming a .tar)."""
    tokens = url.removeprefix("pipe:").split()
    token = next((t for t in reversed(tokens) if ".tar" in t), tokens[-1] if tokens else url)
    return token.split("?")[0].rstrip("/").rsplit("/", 1)[-1]


def _member_names(file: Any) -> Iterator[str]:
    """Names of the regular members local_tar_members would read, without reading their data."""
    end = os.fstat(file.fileno()).st_size
    for name, _, is_file, _, next_offset in _plain_headers(file):
        if next_offset > end:
            return
        if is_file and not _META_MEMBER.match(name):
            yield name
    tar = tarfile.open(fileobj=file, mode="r:")  # noqa: SIM115 - closed with the file
    while (info := tar.next()) is not None:
        tar.members = []
        if info.isreg() and not _META_MEMBER.match(info.name):
            yield info.name


def num_slots_for(world_size: int, num_workers: int) -> int:
    """Readers in the whole job: one per DataLoader worker per rank (num_workers=0 counts as 1)."""
    if world_size < 1 or num_workers < 0:
        raise ValueError(f"world_size must be >= 1 and num_workers >= 0, got {world_size}, {num_workers}")
    return world_size * max(num_workers, 1)


class LoaderBadCounter(BadSampleCounter):
    """BadSampleCounter that also accepts the reader's reasons (LOADER_BAD_REASONS)."""

    reasons = LOADER_BAD_REASONS


def iter_shard(url: str, on_error: Callable[[str, str], None]) -> Iterator[dict[str, Any]]:
    """Samples of one tar in member order: {"__key__", "__url__", ext: bytes, ...}.

    Members are read with webdataset's tar reader; consecutive members sharing a key form one
    sample. Shard failures go to on_error("unreadable_shard" | "truncated_tar", detail).
    """
    local = local_tar_path(url)
    try:
        stream = open(local, "rb") if local else gopen(url)  # noqa: SIM115 - closed below
    except Exception as error:
        on_error("unreadable_shard", f"{url}: {type(error).__name__}: {error}")
        return
    last_member: list[str] = []  # name of the member being read when a read fails
    member_errors: list[BaseException] = []

    def select(name: str) -> bool:
        last_member[:] = [name]
        return True

    def stop(error: BaseException) -> bool:
        member_errors.append(error)
        return False

    current: dict[str, Any] | None = None
    error: BaseException | None = None
    try:
        members = local_tar_members if local else tar_file_iterator
        for member in members(stream, handler=stop, select_files=select):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if current is not None and prefix != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            suffix = suffix.lower()
            if suffix in current:
                current.setdefault("__duplicate__", suffix)
            else:
                current[suffix] = member["data"]
    except Exception as raised:
        error = raised
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    error = member_errors[0] if member_errors else error
    if error is None:
        if current is not None:
            yield current
        return
    detail = f"{url}: {type(error).__name__}: {error.args[0] if error.args else ''}"
    if not last_member:
        on_error("unreadable_shard", detail)
        return
    broken_key = base_plus_ext(last_member[0])[0] if member_errors else None
    if current is not None and broken_key is not None and broken_key != current["__key__"]:
        yield current  # the broken member starts the next sample: this one is complete
    on_error("truncated_tar", detail)


def local_tar_path(url: str) -> str | None:
    """The file path when `url` is a local, uncompressed .tar (read with random access), else None."""
    scheme = _scheme(url)
    if scheme not in (None, "file") or not url.lower().endswith(".tar"):
        return None
    return os.path.expanduser(url[len("file://") :] if scheme == "file" else url)


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it does


def local_tar_members(
    file: Any, handler: Callable[[BaseException], bool], select_files: Callable[[str], bool]
) -> Iterator[dict[str, Any]]:
    """{"fname", "data"} for the regular members of a seekable tar, in order (tar_file_iterator's contract).

    Plain ustar headers (regular files and directories, valid checksum: what webdataset's and
    img2dataset's writers produce) are parsed here, each member's data read in one call; at the
    first other header (pax, GNU long names, end-of-archive, damage) tarfile takes over from that
    offset, so every unusual case keeps tarfile's semantics. Data (or padding) that the file cuts
    short goes to `handler`, which ends the shard; an unreadable first header raises tarfile.ReadError.
    """
    end = os.fstat(file.fileno()).st_size
    for name, size, is_file, data_offset, next_offset in _plain_headers(file):
        # select_files first: the caller's reader notes which member it is on (a truncation names it)
        selected = is_file and not _META_MEMBER.match(name) and select_files(name)
        if next_offset > end:
            handler(tarfile.ReadError(f"unexpected end of data in {name} ({end - data_offset} of {size} bytes)"))
            return
        if selected:
            file.seek(data_offset)
            yield {"fname": name, "data": file.read(size)}
    yield from _tarfile_members(file, handler, select_files)


def _plain_headers(file: Any) -> Iterator[tuple[str, int, bool, int, int]]:
    """(name, size, is_file, data offset, next header's offset) of each plain ustar header from the start
    of the file; at the first other header it stops with the file positioned there (for tarfile)."""
    offset = 0
    while True:
        file.seek(offset)
        header = _plain_ustar_header(file.read(_BLOCK))
        if header is None:
            file.seek(offset)
            return
        name, size, is_file = header
        data_offset, offset = offset + _BLOCK, offset + _BLOCK + -(-size // _BLOCK) * _BLOCK
        yield name, size, is_file, data_offset, offset


_BLOCK = 512
_PLAIN_TYPES = {b"0": True, b"\0": True, b"7": True, b"5": False}  # regular file (True) or directory


def _plain_ustar_header(block: bytes) -> tuple[str, int, bool] | None:
    """(name, size, is_file) of a plain ustar header with a valid checksum; None for anything else."""
    if len(block) != _BLOCK or block[257:262] != b"ustar":
        return None
    is_file = _PLAIN_TYPES.get(block[156:157])
    try:
        checksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"x", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:  # base-256 sizes and damaged fields: tarfile's business
        return None
    if is_file is None or checksum != sum(block) - sum(block[148:156]) + 8 * 32:
        return None
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:263] == b"ustar\0" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape"), size, is_file


def _tarfile_members(
    file: Any, handler: Callable[[BaseException], bool], select_files: Callable[[str], bool]
) -> Iterator[dict[str, Any]]:
    """local_tar_members' contract from the file's current offset, with tarfile reading the headers."""
    tar = tarfile.open(fileobj=file, mode="r:")  # noqa: SIM115 - read lazily by the generator
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError as error:  # the file ends inside the previous member's padding
            handler(error)
            return
        if info is None:
            return
        tar.members = []  # keep no member list: shards can hold millions of members
        if not info.isreg() or _META_MEMBER.match(info.name) or not select_files(info.name):
            continue
        file.seek(info.offset_data)
        data = file.read(info.size)
        if len(data) != info.size:
            handler(tarfile.ReadError(f"unexpected end of data in {info.name} ({len(data)} of {info.size} bytes)"))
            return
        yield {"fname": info.name, "data": data}
