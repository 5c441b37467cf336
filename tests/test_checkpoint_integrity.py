"""Checkpoints cannot be lost silently: every checkpoint carries a manifest (size and CRC-32 of each file);
a resume skips damaged checkpoints, saying which and why, and continues the uninterrupted run's curve from
the newest good one; a bad train.resume path gets the project's own message; rotation keeps the newest good
checkpoint; a full disk fails every rank with one clear error and leaves nothing half-written."""

import errno
import json
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from multiproc import run_ranks
from ppmoe.errors import CheckpointError
from ppmoe.parallel import init_distributed
from ppmoe.train import Trainer
from ppmoe.storage.failures import is_out_of_space
from ppmoe.storage.manifest import MANIFEST, Verdict
from ppmoe.train.checkpoint import CheckpointManager, complete_checkpoints
from ppmoe.train.metrics import read_metrics
from test_parallel_equivalence import tiny_config

STEPS = 6
EVERY_2 = [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=0"]


# ---- runs (in forked ranks) ----------------------------------------------------------------------------
def train(dataset_dir, output_dir, overrides):
    return Trainer(tiny_config(dataset_dir, output_dir, overrides)).fit().last_step


def route_resume_through_latest_good(notes: list) -> None:
    """Record what latest_good (which `resume: auto` goes through) logs."""
    latest_good = CheckpointManager.latest_good

    def recording_latest_good(self, log):
        return latest_good(self, lambda message: (notes.append(message), log(message)))

    CheckpointManager.latest_good = recording_latest_good


def resume_auto(dataset_dir, output_dir, overrides):
    """Train with train.resume=auto; return (last step, what latest_good logged)."""
    notes = []
    route_resume_through_latest_good(notes)
    last = Trainer(tiny_config(dataset_dir, output_dir, [*overrides, "train.resume=auto"])).fit().last_step
    return last, notes


def latest_good_on_ranks(root):
    """latest_good at this world size: (the checkpoint's name, the messages it logged)."""
    rt = init_distributed()
    notes = []
    found = CheckpointManager(root, keep=0, rank=rt.rank).latest_good(notes.append)
    return found.name, notes


def fill_disk_under(step: int, relative: str) -> None:
    """Make the file `relative` of step `step`'s save land on /dev/full, where every write fails with
    ENOSPC, as on a full disk (the link is made as the save directory is created)."""
    start_tmp = CheckpointManager.start_tmp

    def start_tmp_on_full_disk(self, tmp):
        start_tmp(self, tmp)
        if tmp.name == f"step_{step:08d}.tmp":
            link = tmp / relative
            link.parent.mkdir(exist_ok=True)
            link.symlink_to("/dev/full")

    CheckpointManager.start_tmp = start_tmp_on_full_disk


def train_on_full_disk(dataset_dir, output_dir, overrides, relative):
    """Train 4 steps, saving at 2 and 4; step 4's file `relative` hits a full disk. Returns the
    CheckpointError's message (raised on every rank)."""
    fill_disk_under(4, relative)
    try:
        train(dataset_dir, output_dir, [*overrides, "train.steps=4", "checkpoint.every=2"])
    except CheckpointError as error:
        return str(error)
    return "no CheckpointError"


def resume_from(dataset_dir, output_dir, path):
    """Train with train.resume=PATH; return the CheckpointError's message."""
    try:
        train(dataset_dir, output_dir, [*EVERY_2, f"train.resume={path}"])
    except CheckpointError as error:
        return str(error)
    return "no CheckpointError"


# ---- helpers -------------------------------------------------------------------------------------------
def losses(run_dir):
    return {step: m["loss"] for step, m in read_metrics(Path(run_dir) / "metrics.jsonl").items() if "loss" in m}


def copy_run(source: Path, target: Path) -> Path:
    """The run's config and checkpoints (not its metrics or lock): a fresh directory to resume in."""
    target.mkdir(parents=True)
    shutil.copy(source / "config.yaml", target / "config.yaml")
    shutil.copytree(source / "checkpoints", target / "checkpoints")
    return target


def truncate_shard(checkpoint: Path) -> None:
    shard = checkpoint / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def remove_rng(checkpoint: Path) -> None:
    (checkpoint / "rng" / "rank0.pt").unlink()


def flip_byte(checkpoint: Path) -> None:
    shard = checkpoint / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


DAMAGES = {
    "truncated_shard": (truncate_shard, r"__0_0\.distcp: [\d,]+ bytes, expected [\d,]+"),
    "missing_rng": (remove_rng, r"rng/rank0\.pt is missing"),
    "flipped_byte": (flip_byte, r"__0_0\.distcp: contents changed since it was saved \(crc32 [0-9a-f]{8}, "
                                r"expected [0-9a-f]{8}\)"),
}


@pytest.fixture(scope="module")
def saved_run(tiny_dataset, tmp_path_factory):
    """One process, 6 steps, checkpoints at 2, 4 and 6: the run every test damages copies of."""
    out = tmp_path_factory.mktemp("saved")
    assert run_ranks(train, 1, tiny_dataset, str(out), EVERY_2) == [STEPS]
    return out


# ---- manifest ------------------------------------------------------------------------------------------
def assert_manifest_covers(checkpoint: Path, world: int) -> None:
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    on_disk = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                     if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    expected = {".metadata", *(f"rng/rank{r}.pt" for r in range(world))}
    assert expected <= set(on_disk)
    assert {name for name in on_disk if name.endswith(".distcp")} == {f"__{r}_0.distcp" for r in range(world)}
    for name, entry in manifest["files"].items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    assert manifest["world_size"] == world and manifest["checksum"] == "crc32"
    assert CheckpointManager(checkpoint.parent, keep=0, rank=0).verify(checkpoint) == Verdict(True, "")


def test_manifest_lists_every_file_single_process(saved_run):
    for checkpoint in complete_checkpoints(saved_run / "checkpoints"):
        assert_manifest_covers(checkpoint, 1)


def test_manifest_lists_every_file_tp2(tiny_dataset, tmp_path):
    """Two ranks, each checksumming its own files; rank 0 gathers them into one manifest."""
    run_ranks(train, 2, tiny_dataset, str(tmp_path), ["parallel.tp=2", "train.steps=2", "checkpoint.every=2"])
    assert_manifest_covers(tmp_path / "checkpoints" / "step_00000002", 2)


# ---- damaged checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_skips_damaged_checkpoint(damage, saved_run, tiny_dataset, tmp_path):
    damage_fn, reason = DAMAGES[damage]
    run = copy_run(saved_run, tmp_path / "run")
    damage_fn(run / "checkpoints" / "step_00000006")

    # Verified by two ranks sharing the files: both agree on the fallback and the reason.
    found = run_ranks(latest_good_on_ranks, 2, str(run / "checkpoints"))
    assert found[0] == found[1]
    name, notes = found[0]
    assert name == "step_00000004"
    assert len(notes) == 1
    assert re.fullmatch(rf"checkpoint step_00000006 is damaged \({reason}\): resuming from step_00000004 instead",
                        notes[0]), notes

    # A resumed run continues from step 4 on the uninterrupted run's curve, and replaces step 6.
    last, notes = run_ranks(resume_auto, 1, tiny_dataset, str(run), EVERY_2)[0]
    assert last == STEPS
    assert any("resuming from step_00000004 instead" in note for note in notes), notes
    resumed, straight = losses(run), losses(saved_run)
    assert sorted(resumed) == [5, 6]
    assert all(resumed[step] == straight[step] for step in resumed), (resumed, straight)
    manager = CheckpointManager(run / "checkpoints", keep=0, rank=0)
    assert manager.verify(run / "checkpoints" / "step_00000006") == Verdict(True, "")


def test_old_checkpoint_without_manifest_is_accepted_unverified(saved_run, tmp_path):
    root = copy_run(saved_run, tmp_path / "run") / "checkpoints"
    (root / "step_00000006" / MANIFEST).unlink()
    notes = []
    assert CheckpointManager(root, keep=0, rank=0).latest_good(notes.append) == root / "step_00000006"
    assert notes == [f"note: step_00000006 has no {MANIFEST} (saved by an older ppmoe), so its files are "
                     f"unverified; if loading it fails, resume from an older checkpoint"]


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(saved_run, tmp_path):
    root = copy_run(saved_run, tmp_path / "run") / "checkpoints"
    for checkpoint in complete_checkpoints(root):
        remove_rng(checkpoint)
    with pytest.raises(CheckpointError, match=r"all 3 checkpoints in .* are damaged \(the newest, step_00000006: "
                                              r"rng/rank0\.pt is missing\), so there is nothing to resume from: "
                                              r"move .* aside"):
        CheckpointManager(root, keep=0, rank=0).latest_good(print)


def test_manifest_itself_damaged(saved_run, tmp_path):
    root = copy_run(saved_run, tmp_path / "run") / "checkpoints"
    (root / "step_00000006" / MANIFEST).write_text('{"format": "ppmoe checkpoint manifest", "fil')
    verdict = CheckpointManager(root, keep=0, rank=0).verify(root / "step_00000006")
    assert not verdict.ok and verdict.reason.startswith(f"{MANIFEST} is unreadable: {MANIFEST} is not valid JSON")


# ---- train.resume: PATH --------------------------------------------------------------------------------
def explicit_cases(run: Path) -> dict[str, tuple[Path, str]]:
    """Bad train.resume paths (made under `run`) and the message each must get."""
    root = run / "checkpoints"
    newest = root / "step_00000006"
    shutil.copytree(newest, root / "step_00000008.tmp")
    (run / "not_a_checkpoint").mkdir()
    damaged = shutil.copytree(newest, run / "damaged" / "step_00000006")
    flip_byte(damaged)
    (newest / "grown").mkdir()
    return {
        "missing": (run / "nope", r"train\.resume: .*/nope does not exist: point train\.resume at a checkpoint "
                                  r"directory \(<run>/checkpoints/step_<N>\), or set train\.resume=auto"),
        "file": (newest / ".metadata", r"train\.resume: .*/\.metadata is a file, not a checkpoint directory: point "
                                       r"train\.resume at the step_<N> directory \(e\.g\. .*/step_00000006\)"),
        "run_dir": (run, rf"train\.resume: {run} is a run directory, not a checkpoint: point train\.resume at the "
                         rf"newest checkpoint inside, {newest}, or set train\.resume=auto"),
        "checkpoints_dir": (root, rf"train\.resume: {root} is a checkpoints directory, not a checkpoint: point "
                                  rf"train\.resume at the newest checkpoint inside, {newest}"),
        "interrupted": (root / "step_00000008.tmp", r"train\.resume: .*/step_00000008\.tmp is an interrupted save "
                                                    rf"\(.*\): point train\.resume at a finished checkpoint such as "
                                                    rf"{newest}, or set train\.resume=auto"),
        "no_metadata": (run / "not_a_checkpoint", r"is not a complete checkpoint \(no \.metadata\): point "
                                                  r"train\.resume at a step_<N> directory written by ppmoe"),
        "grown": (newest / "grown", rf"is the next stage's grown model inside checkpoint {newest}, which a resume "
                                    rf"builds itself: point train\.resume at {newest}"),
        "damaged": (damaged, r"train\.resume: checkpoint .*/damaged/step_00000006 is damaged \(__0_0\.distcp: "
                             r"contents changed since it was saved .*\): point train\.resume at an older checkpoint, "
                             r"or set train\.resume=auto, which resumes from the newest checkpoint that verifies"),
    }


def test_check_explicit_messages(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    manager = CheckpointManager(run / "checkpoints", keep=0, rank=0)
    for case, (path, message) in explicit_cases(run).items():
        with pytest.raises(CheckpointError) as raised:
            manager.check_explicit(path)
        assert re.search(message, str(raised.value)), (case, str(raised.value))
    good = run / "checkpoints" / "step_00000004"
    assert manager.check_explicit(good) == good


def test_check_explicit_accepts_old_checkpoint_with_note(saved_run, tmp_path):
    root = copy_run(saved_run, tmp_path / "run") / "checkpoints"
    (root / "step_00000004" / MANIFEST).unlink()
    notes = []
    manager = CheckpointManager(root, keep=0, rank=0)
    assert manager.check_explicit(root / "step_00000004", notes.append) == root / "step_00000004"
    assert len(notes) == 1 and "unverified" in notes[0]


def test_damaged_unverified_checkpoint_fails_to_load_with_checkpoint_error(saved_run, tiny_dataset, tmp_path):
    """An old checkpoint (no manifest) cannot be verified, so damage shows only when it is read: that
    too is a CheckpointError naming the checkpoint, not DCP's traceback."""
    run = copy_run(saved_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step_00000004"
    (checkpoint / MANIFEST).unlink()
    truncate_shard(checkpoint)
    message = run_ranks(resume_from, 1, tiny_dataset, str(run), str(checkpoint))[0]
    assert re.fullmatch(rf"cannot read the (trainer state|model and optimizer state) from checkpoint {checkpoint} "
                        r"\(.*\): it is damaged or was saved for another model shape; resume from another checkpoint "
                        r"\(train\.resume=auto skips damaged ones\)", message), message


def test_unreadable_metadata_is_a_checkpoint_error(saved_run, tmp_path):
    root = copy_run(saved_run, tmp_path / "run") / "checkpoints"
    (root / "step_00000004" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"cannot read the trainer state from checkpoint .*step_00000004"):
        CheckpointManager(root, keep=0, rank=0).read_trainer_state(root / "step_00000004", {"step": 0})


# ---- rotation ------------------------------------------------------------------------------------------
def checkpoint_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_rotation_keeps_newest_good_checkpoint_behind_damaged_ones(saved_run, tmp_path):
    root = copy_run(saved_run, tmp_path / "run") / "checkpoints"
    for step, damage in [(8, truncate_shard), (10, remove_rng)]:
        damage(shutil.copytree(root / "step_00000006", root / f"step_{step:08d}"))
    shutil.copytree(root / "step_00000006", root / "step_00000003.tmp")  # a crashed save, superseded
    shutil.copytree(root / "step_00000006", root / "step_00000012.tmp")  # newer than any complete one
    CheckpointManager(root, keep=2, rank=0).prune()
    assert checkpoint_dirs(root) == ["step_00000006", "step_00000008", "step_00000010", "step_00000012.tmp"]


def test_rotation_of_good_checkpoints_keeps_the_newest(saved_run, tmp_path):
    root = copy_run(saved_run, tmp_path / "run") / "checkpoints"
    flip_byte(root / "step_00000006")  # the cheap check reads no contents: kept as good, like step_4
    CheckpointManager(root, keep=2, rank=0).prune()
    assert checkpoint_dirs(root) == ["step_00000004", "step_00000006"]


# ---- full disk -----------------------------------------------------------------------------------------
FULL_DISK = {
    # one process: DCP's own shard write fails
    "single_dcp_shard": (1, [], "__0_0.distcp", 0),
    # rank 1 only, outside DCP: rank 0 wrote everything and must still fail, not hang
    "tp2_rank1_rng": (2, ["parallel.tp=2"], "rng/rank1.pt", 1),
    # rank 1 only, inside DCP (its CheckpointException carries rank 1's OSError to rank 0)
    "tp2_rank1_dcp_shard": (2, ["parallel.tp=2"], "__1_0.distcp", 1),
}


@pytest.mark.parametrize("case", FULL_DISK)
def test_full_disk_fails_every_rank_cleanly(case, tiny_dataset, tmp_path):
    world, overrides, relative, failing_rank = FULL_DISK[case]
    # (a rank left waiting in a collective would hang: fail within a minute instead)
    messages = run_ranks(train_on_full_disk, world, tiny_dataset, str(tmp_path), overrides, relative, timeout=60)
    root = tmp_path / "checkpoints"
    for message in messages:
        assert message.startswith(f"no space left on device while saving step 4 to {root}: the previous "
                                  f"checkpoint step_00000002 is intact; free space or set checkpoint.dir to "
                                  f"another disk (rank {failing_rank}: "), message
        assert "No space left on device" in message
    assert checkpoint_dirs(root) == ["step_00000002"]  # no step_4, no step_4.tmp
    assert CheckpointManager(root, keep=0, rank=0).verify(root / "step_00000002") == Verdict(True, "")


def test_torch_save_full_disk_error_is_recognized():
    """torch.save to a path on a full disk raises a RuntimeError without errno; inside DCP it arrives
    wrapped in a CheckpointException. Both count as out of space; other failures do not."""
    with pytest.raises(RuntimeError, match="enforce fail at inline_container.cc") as raised:
        torch.save({"x": torch.zeros(1000)}, "/dev/full")
    assert is_out_of_space(raised.value)
    wrapped = dcp.CheckpointException("save failed", {1: (raised.value, None)})
    assert is_out_of_space(wrapped)
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_out_of_space(PermissionError(errno.EACCES, "Permission denied"))
