"""Checkpoint manifests: the size and CRC-32 of every file of a checkpoint directory, written last before
the directory is published, and the checks of a directory against its manifest (by any subset of ranks,
each a share of the files).

Used by the trainer's checkpoints (ppmoe/train/checkpoint.py) and by the growth transform's grown
checkpoints (ppmoe/growth/transform.py). Plain files and JSON: no knowledge of what the files hold.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, NamedTuple

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ppmoe checkpoint manifest"
MANIFEST_VERSION = 1
# Written into a finished step_<N>/ by the growth transform, with a manifest of its own.
NOT_IN_MANIFEST = frozenset({"grown", "grown.tmp"})
# Checksums stream files in chunks of this size: memory stays flat however large a shard is.
CHUNK_BYTES = 8 << 20


class Verdict(NamedTuple):
    """The outcome of verifying a checkpoint. ok with an empty reason: every file matches its manifest.
    ok with a reason: accepted unverified (an older ppmoe wrote no manifest); the reason says so.
    Not ok: the reason names the first bad file and what is wrong with it."""

    ok: bool
    reason: str


class Finding(NamedTuple):
    """One rank's part of a verdict: `position` orders findings so that every rank picks the same first
    problem (-1: the manifest itself, i: the i-th file of the manifest)."""

    position: int
    ok: bool
    reason: str


# ---- manifest ------------------------------------------------------------------------------------------
def size_and_crc32(path: Path) -> tuple[int, int]:
    """Size and CRC-32 of a file, streamed. Why CRC-32: it guards against accidents (truncation, torn
    writes, bit rot), not tampering, and zlib's is among the fastest checksums in the standard library
    (~2 GB/s per core measured here, about the speed of reading from the page cache; sha256 is ~1.5x
    slower), so verifying costs roughly one read of the checkpoint, shared by all ranks. Any change of up
    to 32 consecutive bits is always caught, anything else all but once in 4 billion."""
    size, crc = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def manifest_entry(path: Path) -> dict[str, Any]:
    size, crc = size_and_crc32(path)
    return {"size": size, "crc32": f"{crc:08x}"}


def checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint directory as a relative POSIX path, sorted; the manifest itself and the
    growth transform's grown/ excluded."""
    found = []
    for parent, dirs, files in os.walk(directory):
        here = Path(parent)
        if here == directory:
            dirs[:] = [d for d in dirs if d not in NOT_IN_MANIFEST]
            files = [f for f in files if f != MANIFEST]
        found.extend((here / f).relative_to(directory).as_posix() for f in files)
    return sorted(found)


def files_written_by(directory: Path, rank: int) -> list[str]:
    """The files of a checkpoint being written that `rank` wrote itself: DCP's FileSystemWriter names each
    rank's data files __<rank>_<i>.distcp, the RNG file is per rank, and rank 0, DCP's coordinator,
    writes .metadata. (Checksumming where the bytes were written spreads the cost over the ranks.)"""
    mine = sorted(p.name for p in directory.glob(f"__{rank}_*.distcp"))
    mine.append(f"rng/rank{rank}.pt")
    if rank == 0:
        mine.append(".metadata")
    return mine


def build_manifest(step: int, world_size: int, entries: dict[str, dict]) -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "world_size": world_size,
            "checksum": "crc32", "files": dict(sorted(entries.items()))}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's files: {relative path: {"size", "crc32"}}. Raises ValueError (what is wrong with it)
    for a manifest that cannot be trusted, FileNotFoundError for none."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST} is not a ppmoe checkpoint manifest")
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("crc32"), str)
            for e in files.values()):
        raise ValueError(f"{MANIFEST} is not a ppmoe checkpoint manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ValueError(f"{MANIFEST} has version {version!r}, not one this ppmoe reads (up to "
                         f"{MANIFEST_VERSION}): upgrade ppmoe")
    return files


def unverified_note(directory: Path) -> str:
    return (f"{directory.name} has no {MANIFEST} (saved by an older ppmoe), so its files are unverified; "
            f"if loading it fails, resume from an older checkpoint")


# ---- checking files ------------------------------------------------------------------------------------
def size_problem(directory: Path, relative: str, expected: dict) -> str | None:
    """What is wrong with the file's presence or size, or None."""
    path = directory / relative
    if not path.is_file():
        return f"{relative} is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{relative}: {size:,} bytes, expected {expected['size']:,}"
    return None


def file_problem(directory: Path, relative: str, expected: dict) -> str | None:
    """What is wrong with the file (missing, size, contents), or None. An error reading it is a finding,
    not an exception: the other ranks wait for this one's verdict."""
    try:
        problem = size_problem(directory, relative, expected)
        if problem is not None:
            return problem
        _, crc = size_and_crc32(directory / relative)
    except OSError as e:
        return f"{relative} cannot be read ({e.strerror or e})"
    if f"{crc:08x}" != expected["crc32"]:
        return f"{relative}: contents changed since it was saved (crc32 {crc:08x}, expected {expected['crc32']})"
    return None


def share_finding(directory: Path, rank: int, world_size: int) -> Finding:
    """This rank's share of a verification: the manifest, then every world_size-th file of it in full."""
    if not (directory / MANIFEST).is_file():
        return Finding(-1, True, unverified_note(directory))
    try:
        files = read_manifest(directory)
    except (OSError, ValueError) as e:
        return Finding(-1, False, f"{MANIFEST} is unreadable: {e}")
    names = sorted(files)
    for position in range(rank, len(names), world_size):
        problem = file_problem(directory, names[position], files[names[position]])
        if problem is not None:
            return Finding(position, False, problem)
    return Finding(len(names), True, "")


def looks_intact(directory: Path) -> bool:
    """The cheap check (no reading): every file of the manifest is there with its size; a checkpoint of an
    older ppmoe, without manifest, passes."""
    if not (directory / MANIFEST).is_file():
        return True
    try:
        files = read_manifest(directory)
        return all(size_problem(directory, name, entry) is None for name, entry in files.items())
    except (OSError, ValueError):
        return False


def combine(findings: list[Finding]) -> Verdict:
    """All ranks' findings as one verdict, the same on every rank: the first problem in manifest order,
    else the unverified note if any rank has one."""
    problems = sorted(f for f in findings if not f.ok)
    if problems:
        return Verdict(False, problems[0].reason)
    notes = [f.reason for f in findings if f.reason]
    return Verdict(True, notes[0] if notes else "")
