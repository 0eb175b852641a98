"""Checkpoints name the history they were written after instead of holding it.

A checkpoint used to carry the whole history, so each round's write grew with the run. It now
holds how many lines of ``history.jsonl`` are the run's and their chained digest; resuming
reads those lines, refuses a file that lost or changed them, and still reads the old format.
The runs are the real ServerApp and ClientApps in this process (Flower's wire format). A
new checkpoint reaches the disk (file and folder fsynced) before an older one is deleted, and
so do the other files something later starts from: an instance's feature cache, the keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from sigmax_fl import runs
from sigmax_fl.paths import PRIVATE, write_durably

from .conftest import ROOT, in_process_run, small_run

INSTANCES = ("coinbase-btc-usd-1d", "bitstamp-eth-usd-1d")


def _config(tmp_path: Path, run_name: str, **extra: object) -> dict:
    return small_run(tmp_path, run_name, INSTANCES, **{"keep-checkpoints": 0, **extra})


def _checkpoint(run_dir: Path, server_round: int) -> dict:
    return torch.load(run_dir / runs.CHECKPOINTS / f"round-{server_round:05d}.pt")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The final model of the 3-round run every resumed run here must end with."""
    tmp_path = tmp_path_factory.mktemp("unbroken")
    return in_process_run(_config(tmp_path, "unbroken"), len(INSTANCES))


@pytest.fixture
def stopped(tmp_path: Path) -> tuple[dict, Path]:
    """The same run stopped after round 2: its config (3 rounds) and folder."""
    config = _config(tmp_path, "stopped")
    in_process_run({**config, "num-server-rounds": 2}, len(INSTANCES))
    return config, tmp_path / "outputs" / "stopped"


@pytest.mark.parametrize(("on_receipt", "scored_later"), [(True, 1), (False, 0)])
def test_each_checkpoint_names_the_history_lines_written_before_it(
    tmp_path: Path, on_receipt: bool, scored_later: int
) -> None:
    # Execute: one exchange a round (round r's model scored by round r + 1's replies) or two
    config = _config(tmp_path, "run", **{"evaluate-on-receipt": on_receipt})
    in_process_run(config, len(INSTANCES))

    # Assert: no checkpoint holds the history; each names a prefix of history.jsonl that
    # checkpointed_history reads back, record for record
    run_dir = tmp_path / "outputs" / "run"
    lines = (run_dir / runs.HISTORY_JSONL).read_text().splitlines()
    assert len(lines) == 3
    for server_round in (1, 2, 3):
        path = run_dir / runs.CHECKPOINTS / f"round-{server_round:05d}.pt"
        payload = runs.read_checkpoint(path)
        assert payload["format"] == runs.CHECKPOINT_FORMAT == 2
        assert "history" not in payload
        assert payload["history_rounds"] == server_round - scored_later
        history = runs.checkpointed_history(path, payload)
        assert history == [json.loads(line) for line in lines[: server_round - scored_later]]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("edit", "not the rounds the checkpoint was written after"),
        ("truncate", r"must hold the 1 round\(s\) .* \(it has 0 line\(s\)\)"),
        ("blank", r"must hold the 1 round\(s\) .* \(line 1 is empty\)"),
        ("delete", r"must hold the 1 round\(s\) .* \(no such file\)"),
    ],
)
def test_resume_refuses_a_history_that_lost_or_changed_its_rounds_and_keeps_it(
    stopped: tuple[dict, Path], damage: str, message: str
) -> None:
    # Prepare: round 2's checkpoint names history line 1 (round 2 was scored after it)
    config, run_dir = stopped
    history = run_dir / runs.HISTORY_JSONL
    first, *rest = history.read_text().splitlines(keepends=True)
    if damage == "edit":
        record = json.loads(first)
        record["seconds"] += 1.0
        history.write_text(json.dumps(record) + "\n" + "".join(rest))
    elif damage == "truncate":
        history.write_text("")
    elif damage == "blank":
        history.write_text("\n" + first + "".join(rest))
    else:
        history.unlink()
    left = history.read_bytes() if history.exists() else None
    checkpoints = sorted((run_dir / runs.CHECKPOINTS).iterdir())

    # Execute / Assert: refused with the file and what was wrong; nothing rewritten
    with pytest.raises(ValueError, match=message) as refused:
        in_process_run({**config, "resume-from": "latest"}, len(INSTANCES))
    assert str(history) in str(refused.value)
    assert "round-00002.pt" in str(refused.value)
    assert (history.read_bytes() if history.exists() else None) == left
    assert sorted((run_dir / runs.CHECKPOINTS).iterdir()) == checkpoints


def test_resume_drops_history_lines_after_the_checkpoint_and_ends_with_the_same_model(
    stopped: tuple[dict, Path], unbroken: dict[str, torch.Tensor]
) -> None:
    # Prepare: the closing phase of the stopped run appended round 2 after its last
    # checkpoint; a line a crash cut short follows it
    config, run_dir = stopped
    history = run_dir / runs.HISTORY_JSONL
    with history.open("a") as handle:
        handle.write('{"round": 3, "cut sh')
    named = _checkpoint(run_dir, 2)["history_rounds"]
    dropped = b"".join(history.read_bytes().splitlines(keepends=True)[named:])

    # Execute
    resumed = in_process_run({**config, "resume-from": "latest"}, len(INSTANCES))

    # Assert: the same model and rounds; the resumed run's own checkpoint names its history
    # (the rewritten lines and the new ones), so it can be resumed in turn
    _same(resumed, unbroken)
    rounds = [json.loads(line)["round"] for line in history.read_text().splitlines()]
    assert rounds == [1, 2, 3]
    # ... and the lines it dropped are set aside as they were, not lost
    (aside,) = _set_aside(run_dir)
    assert aside.name.startswith("0001-resumed-from-round-00002-")
    assert _files(aside) == {runs.HISTORY_JSONL: dropped}
    last = run_dir / runs.CHECKPOINTS / "round-00003.pt"
    named = runs.checkpointed_history(last, runs.read_checkpoint(last))
    assert [r["round"] for r in named] == [1, 2]


@pytest.mark.parametrize("history_file", ["gone", "kept", "edited"])
def test_a_checkpoint_that_holds_its_history_format_1_still_resumes(
    stopped: tuple[dict, Path], unbroken: dict[str, torch.Tensor], history_file: str
) -> None:
    # Prepare: round 2's checkpoint as the earlier format wrote it (the history inside); the
    # run's history file gone (that format needs none), as it was, or with its first line edited
    config, run_dir = stopped
    path = run_dir / runs.CHECKPOINTS / "round-00002.pt"
    payload = _checkpoint(run_dir, 2)
    history = runs.checkpointed_history(path, payload)
    for key in ("history_rounds", "history_digest"):
        del payload[key]
    torch.save({**payload, "format": 1, "history": json.dumps(history)}, path)
    jsonl = run_dir / runs.HISTORY_JSONL
    if history_file == "gone":
        jsonl.unlink()
    elif history_file == "edited":
        jsonl.write_bytes(b'{"round": 1, "edited": true}\n' + jsonl.read_bytes().split(b"\n", 1)[1])
    before = jsonl.read_bytes() if jsonl.is_file() else b""

    # Execute
    resumed = in_process_run({**config, "resume-from": str(path)}, len(INSTANCES))

    # Assert: the same model, and the history file written again from the checkpoint; what
    # it held beyond the checkpoint's records (all of it, once edited) is set aside
    _same(resumed, unbroken)
    lines = (run_dir / runs.HISTORY_JSONL).read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[0]) == history[0]
    aside = b"".join(f.joinpath(runs.HISTORY_JSONL).read_bytes() for f in _set_aside(run_dir))
    records = b"".join(json.dumps(r, default=str).encode() + b"\n" for r in history)
    expected = {"gone": b"", "kept": before[len(records) :], "edited": before}[history_file]
    assert aside == expected
    if history_file == "kept":  # the closing phase's line after the checkpoint's records
        assert before.startswith(records) and aside


def test_a_run_whose_every_round_is_skipped_fails_and_writes_no_model(tmp_path: Path) -> None:
    # Prepare: an update-norm bound no update meets, so every reply of every round is rejected
    untrained = _config(tmp_path, "untrained", **{"num-server-rounds": 2, "max-update-norm": 1e-9})

    # Execute / Assert: the run fails, naming the skipped rounds and where to look
    with pytest.raises(runs.NothingTrainedError, match=r": rounds 1, 2 were skipped \(") as err:
        in_process_run(untrained, len(INSTANCES))
    run_dir = tmp_path / "outputs" / "untrained"
    assert str(run_dir / runs.HISTORY_JSON) in str(err.value)

    # Assert: its history is kept, and no final model passes for a trained one
    history = json.loads((run_dir / runs.HISTORY_JSON).read_text())
    assert [(r["round"], r["skipped"]) for r in history] == [(1, True), (2, True)]
    assert all(r["train"]["replies-rejected"] == len(INSTANCES) for r in history)
    assert not (run_dir / runs.FINAL_MODEL).exists()
    assert not (run_dir / "summary.json").exists()

    # ... while a run that trained lists no skipped round in its summary
    trained = _config(tmp_path, "trained", **{"num-server-rounds": 1})
    in_process_run(trained, len(INSTANCES))
    summary = json.loads((tmp_path / "outputs" / "trained" / "summary.json").read_text())
    assert summary["rounds_skipped"] == [] and summary["rounds_run"] == 1


def _record(server_round: int, skipped: bool) -> dict:
    return {"round": server_round, "skipped": skipped}


@pytest.mark.parametrize(
    ("skipped", "final_round", "message"),
    [
        ([], 0, "no round ran"),
        ([True, False], 1, "the final model is round 1's, the best by validation, and round 1 was"),
        ([True, False, False], 1, "round 1 was skipped up to it"),
    ],
)
def test_a_final_model_no_round_trained_is_refused(
    tmp_path: Path, skipped: list[bool], final_round: int, message: str
) -> None:
    history = [_record(r, s) for r, s in enumerate(skipped, start=1)]
    with pytest.raises(runs.NothingTrainedError, match=re.escape(message)):
        runs.check_trained(tmp_path, history, final_round)


@pytest.mark.parametrize(
    ("skipped", "final_round", "listed"),
    [([True, False], 2, [1]), ([False, True], 2, [2]), ([False, True, True], 1, [2, 3])],
)
def test_a_final_model_some_round_trained_passes_and_the_skipped_are_listed(
    tmp_path: Path,
    skipped: list[bool],
    final_round: int,
    listed: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    history = [_record(r, s) for r, s in enumerate(skipped, start=1)]
    with caplog.at_level(logging.WARNING, logger="flwr.sigmax_fl.runs"):
        assert runs.check_trained(tmp_path, history, final_round) == listed
    said = f"{', '.join(map(str, listed))} {'was' if len(listed) == 1 else 'were'} skipped"
    assert said in caplog.text and str(tmp_path / runs.HISTORY_JSON) in caplog.text


def _set_aside(run_dir: Path) -> list[Path]:
    """The folders resumes of this run set dropped files and lines aside in, oldest first."""
    folder = run_dir / runs.ABANDONED
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_resuming_an_earlier_checkpoint_sets_aside_what_it_drops_and_a_second_one_too(
    tmp_path: Path, unbroken: dict[str, torch.Tensor]
) -> None:
    # Prepare: a finished 3-round run, its history and audit
    config = _config(tmp_path, "rewound")
    in_process_run(config, len(INSTANCES))
    run_dir = tmp_path / "outputs" / "rewound"
    folder = run_dir / runs.CHECKPOINTS
    named = _checkpoint(run_dir, 1)["history_rounds"]
    old_history = (run_dir / runs.HISTORY_JSONL).read_bytes().splitlines(keepends=True)
    old_audit = (run_dir / runs.AUDIT_JSONL).read_bytes().splitlines(keepends=True)
    back_to_1 = {**config, "num-server-rounds": 2, "resume-from": str(folder / "round-00001.pt")}

    # Execute: taken back to round 1 and stopped after round 2 (as a crash would stop it),
    # then resumed from the newest checkpoint, then taken back to round 1 once more
    in_process_run(back_to_1, len(INSTANCES))
    (first,) = _set_aside(run_dir)
    first_files = _files(first)
    named_by_2 = _checkpoint(run_dir, 2)["history_rounds"]
    lines = (run_dir / runs.HISTORY_JSONL).read_bytes().splitlines(keepends=True)
    closing = b"".join(lines[named_by_2:])
    resumed = in_process_run({**config, "resume-from": "latest"}, len(INSTANCES))
    audit = [json.loads(line) for line in (run_dir / runs.AUDIT_JSONL).read_text().splitlines()]
    in_process_run(back_to_1, len(INSTANCES))
    later = _set_aside(run_dir)

    # Assert: the old run's checkpoints of rounds 2 and 3, its final model, summary and
    # history list, and the history and audit lines after round 1 were set aside, so
    # "latest" found the rewound run's round 2; the audit holds each round once
    assert sorted(first_files) == [
        "audit.jsonl",
        "checkpoints/round-00002.pt",
        "checkpoints/round-00003.pt",
        "final_model.pt",
        "history.json",
        "history.jsonl",
        "summary.json",
    ]
    assert first.name.startswith("0001-resumed-from-round-00001-")
    assert first_files["history.jsonl"] == b"".join(old_history[named:])
    dropped = [x for x in old_audit if json.loads(x)["round"] > 1]
    assert first_files["audit.jsonl"] == b"".join(dropped)
    _same(torch.load(first / runs.FINAL_MODEL, weights_only=True), unbroken)
    assert json.loads(first_files["summary.json"])["rounds_run"] == 3
    _same(resumed, unbroken)
    entries = sorted((a["round"], a["instance_id"]) for a in audit)
    assert entries == sorted((r, i) for r in (1, 2, 3) for i in INSTANCES)
    # ... the resume from round 2 set aside the closing phase's line after it, and the second
    # rewind the resumed run's later checkpoints and outputs, each in a folder of its own,
    # leaving the first one's as it was
    assert [p.name.rsplit("-", 1)[0] for p in later] == [
        "0001-resumed-from-round-00001",
        "0002-resumed-from-round-00002",
        "0003-resumed-from-round-00001",
    ]
    assert later[0] == first and _files(first) == first_files
    assert _files(later[1]) == {"history.jsonl": closing}
    assert sorted(_files(later[2])) == sorted(first_files)
    _same(torch.load(later[2] / runs.FINAL_MODEL, weights_only=True), resumed)


def test_a_resume_stopped_while_setting_aside_loses_nothing_when_tried_again(
    tmp_path: Path, unbroken: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a finished 3-round run, to be taken back to round 1; moving its final model
    # aside fails once, as a crash or a full disk would stop it there
    config = _config(tmp_path, "interrupted")
    in_process_run(config, len(INSTANCES))
    run_dir = tmp_path / "outputs" / "interrupted"
    files = {name: (run_dir / name).read_bytes() for name in (runs.HISTORY_JSONL, runs.AUDIT_JSONL)}
    old_final = (run_dir / runs.FINAL_MODEL).read_bytes()
    back_to_1 = {**config, "resume-from": str(run_dir / runs.CHECKPOINTS / "round-00001.pt")}
    replace = os.replace

    def refuse_the_final_model(src: os.PathLike, dst: os.PathLike) -> None:
        if Path(src).name == runs.FINAL_MODEL and runs.ABANDONED in Path(dst).parts:
            raise OSError(f"injected: cannot move {src}")
        replace(src, dst)

    # Execute: the resume stops there, then is tried again
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refuse_the_final_model)
        with pytest.raises(OSError, match="injected"):
            in_process_run(back_to_1, len(INSTANCES))
    cut = {name: (run_dir / name).read_bytes() for name in files}
    resumed = in_process_run(back_to_1, len(INSTANCES))

    # Assert: nothing was cut before the failure; the retry set the old run's final model
    # aside before the resumed run wrote its own
    assert cut == files
    aside = [p.read_bytes() for f in _set_aside(run_dir) for p in f.rglob(runs.FINAL_MODEL)]
    assert aside == [old_final]
    _same(resumed, unbroken)


def test_resume_refuses_an_audit_line_that_is_not_an_entry_and_changes_nothing(
    stopped: tuple[dict, Path],
) -> None:
    # Prepare: a line that is not the server's in the audit; the history holds a line after
    # the checkpoint's (the closing phase's), which a resume would cut
    config, run_dir = stopped
    audit, history = run_dir / runs.AUDIT_JSONL, run_dir / runs.HISTORY_JSONL
    audit.write_text("not json\n" + audit.read_text())
    before = [audit.read_bytes(), history.read_bytes()]

    # Execute / Assert: refused, naming the file and the line; both files as they were
    with pytest.raises(ValueError, match=r"audit.jsonl line 1 is not an audit entry"):
        in_process_run({**config, "resume-from": "latest"}, len(INSTANCES))
    assert [audit.read_bytes(), history.read_bytes()] == before


WRITE_TWO_CHECKPOINTS = """
import sys
from pathlib import Path
import torch
from sigmax_fl import runs
for server_round in (1, 2):
    runs.write_checkpoint(Path(sys.argv[1]), server_round, {"w": torch.zeros(3)}, keep=1)
"""


STRACE = [
    "strace", "-f", "-y", "-e",
    "trace=fsync,?rename,renameat,?renameat2,?unlink,unlinkat,?mkdir,mkdirat",
]  # fmt: skip
"""The calls that write a file or folder durably and delete one (``?``: not every architecture
has the older ones); ``-y`` prints the path behind each file descriptor."""


def _can_trace() -> bool:
    """strace is installed and allowed to trace here (containers may forbid ptrace)."""
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run([*STRACE, "-o", os.devnull, "true"], capture_output=True, timeout=60)
    return probe.returncode == 0


def _traced(script: str, argument: Path, trace: Path) -> Callable[[str, int], int]:
    """Run ``script`` under strace; a finder of the first call matching a pattern after another."""
    if not _can_trace():  # checked here, not at collection: every test worker collects
        pytest.skip("needs strace, allowed to trace, to see syscalls")
    command = [*STRACE, "-o", str(trace), sys.executable, "-c", script, str(argument)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    calls = [re.sub(r"^\d+\s+", "", line) for line in trace.read_text().splitlines()]

    def first(pattern: str, after: int = -1) -> int:
        found = [i for i, c in enumerate(calls) if i > after and re.search(pattern, c)]
        assert found, f"no {pattern!r} after call {after} in:\n" + "\n".join(calls)
        return found[0]

    return first


def test_a_new_checkpoint_is_on_disk_before_the_older_one_is_deleted(tmp_path: Path) -> None:
    # Execute: round 2's checkpoint replaces round 1's (keep-checkpoints = 1), under strace
    first = _traced(WRITE_TWO_CHECKPOINTS, tmp_path, tmp_path / "trace.txt")

    # Assert: the file's bytes, then its name, then the old file's removal, in that order
    synced = first(r"^fsync\(\d+<[^>]*/checkpoints/\.round-00002\.pt\.\w+\.tmp>\)")
    renamed = first(r"^rename(at2?)?\(.*\.tmp\", .*/checkpoints/round-00002\.pt\"", synced)
    folder_synced = first(r"^fsync\(\d+<[^>]*/checkpoints>\)", renamed)
    first(r"^unlink(at)?\(.*/checkpoints/round-00001\.pt\"", folder_synced)
    assert sorted(p.name for p in (tmp_path / runs.CHECKPOINTS).iterdir()) == ["round-00002.pt"]


FIRST_CHECKPOINT_OF_A_NEW_RUN = """
import sys
import torch
from sigmax_fl import runs
run_dir = runs.create_run_dir(sys.argv[1], "fresh", 1)
runs.write_checkpoint(run_dir, 1, {"w": torch.zeros(3)}, keep=1)
runs.write_json(run_dir / "summary.json", {"rounds_run": 1})
"""


def test_a_new_run_folder_and_its_files_are_on_disk_with_its_parents(tmp_path: Path) -> None:
    # Execute: a run's first checkpoint, in an outputs folder that does not exist yet
    outputs = tmp_path / "new" / "outputs"
    first = _traced(FIRST_CHECKPOINT_OF_A_NEW_RUN, outputs, tmp_path / "trace.txt")

    # Assert: each new folder's name is synced into its parent before anything is written in it
    made = -1
    for folder in (outputs.parent, outputs, outputs / "fresh", outputs / "fresh" / "checkpoints"):
        made = first(rf'^mkdir(at)?\(.*"{re.escape(str(folder))}"', made)
        made = first(rf"^fsync\(\d+<{re.escape(str(folder.parent))}>\)", made)
    renamed = first(r'^rename(at2?)?\(.*\.tmp", .*/checkpoints/round-00001\.pt"', made)
    first(rf"^fsync\(\d+<{re.escape(str(outputs / 'fresh' / 'checkpoints'))}>\)", renamed)
    assert (outputs / "fresh" / runs.CHECKPOINTS / "round-00001.pt").is_file()
    # ... and a run's JSON files are written as durably as its checkpoints
    synced = first(r"^fsync\(\d+<[^>]*/fresh/\.summary\.json\.\w+\.tmp>\)", renamed)
    renamed = first(r'^rename(at2?)?\(.*\.tmp", .*/fresh/summary\.json"', synced)
    first(rf"^fsync\(\d+<{re.escape(str(outputs / 'fresh'))}>\)", renamed)
    assert json.loads((outputs / "fresh" / "summary.json").read_text()) == {"rounds_run": 1}


CACHE_AND_KEYS = """
import sys
from pathlib import Path
from sigmax_fl.data import resolve_source
from sigmax_fl.dataset import Recipe, load_instance
from sigmax_fl.deploy.credentials import ensure_credentials
from sigmax_fl.settings import Settings
folder = Path(sys.argv[1])
recipe = Recipe.of(Settings())
load_instance(resolve_source("synthetic:instance=5:seed=41"), recipe, folder / "cache")
ensure_credentials(folder / "keys", ["alpha"])
"""


def test_an_instances_feature_cache_and_the_keys_are_on_disk_before_they_count(
    tmp_path: Path,
) -> None:
    # Execute: a fresh instance caches its features, a deployment makes its keys, under strace
    first = _traced(CACHE_AND_KEYS, tmp_path, tmp_path / "trace.txt")

    # Assert: each new folder's name is synced into its parent
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    for folder in (cache, keys):
        made = first(rf'^mkdir(at)?\(.*"{re.escape(str(folder))}"')
        first(rf"^fsync\(\d+<{re.escape(str(tmp_path))}>\)", made)
    # Assert: each file's bytes are synced, then it is renamed into place, then its folder synced
    for name in (r"synthetic-0005-\w+\.npz", r"synthetic-0005-\w+\.json"):
        synced = first(rf"^fsync\(\d+<{re.escape(str(cache))}/\.{name}\.\w+\.tmp>\)")
        renamed = first(rf'^rename(at2?)?\(.*\.tmp", .*/cache/{name}"', synced)
        first(rf"^fsync\(\d+<{re.escape(str(cache))}>\)", renamed)
    for name in ("ca.key", "superlink.key", "supernode-alpha.key", "superlink.crt"):
        synced = first(rf"^fsync\(\d+<{re.escape(str(keys))}/\.{re.escape(name)}\.\w+\.tmp>\)")
        renamed = first(rf'^rename(at2?)?\(.*\.tmp", .*/keys/{re.escape(name)}"', synced)
        first(rf"^fsync\(\d+<{re.escape(str(keys))}>\)", renamed)
    assert not [p for p in (*cache.iterdir(), *keys.iterdir()) if ".tmp" in p.name]


def test_a_file_where_a_folder_should_be_is_named(tmp_path: Path) -> None:
    # Prepare: outputs-dir points below a file
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")

    # Execute / Assert: refused, naming the file; nothing created, the file as it was
    with pytest.raises(FileExistsError, match=re.escape(str(blocker))):
        runs.create_run_dir(str(blocker / "runs"), "r", 1)
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


def test_a_refused_rename_leaves_the_target_and_no_temporary_file(tmp_path: Path) -> None:
    # Prepare: a folder where the file should go, so the rename onto it fails
    target = tmp_path / "summary.json"
    target.mkdir()
    (target / "kept").write_text("x")

    # Execute / Assert: the rename's error; the folder as it was, no temporary file beside it
    with pytest.raises(OSError):
        runs.write_json(target, {"rounds_run": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert (target / "kept").read_text() == "x"


def test_runs_started_at_once_under_one_name_get_folders_of_their_own(tmp_path: Path) -> None:
    # Execute: eight runs named alike make their folders at the same time
    outputs = tmp_path / "outputs"
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: runs.create_run_dir(str(outputs), "same", 1), range(8)))

    # Assert: the name, then its numbered successors, each folder given to one run only
    expected = ["same", *(f"same-{k}" for k in range(2, 9))]
    assert sorted(p.name for p in made) == sorted(expected)
    assert sorted(p.name for p in outputs.iterdir()) == sorted(expected)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_private_file_replaces_one_readable_by_all(tmp_path: Path) -> None:
    # Prepare: a file of the same name, left readable by all by an older version
    path = tmp_path / "instance.npz"
    path.write_bytes(b"older and longer")
    path.chmod(0o644)
    umask = os.umask(0o022)  # new files readable by every user unless the app says otherwise

    # Execute
    try:
        write_durably(path, lambda handle: handle.write(b"new"), PRIVATE)
    finally:
        os.umask(umask)

    # Assert: the new bytes, owner-only, and no temporary file left beside them
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["instance.npz"]
