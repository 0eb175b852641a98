"""What ``flwr run`` is handed: the app's own files, packed into the same FAB as the folder."""

from __future__ import annotations

from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from sigmax_fl.deploy.flwr_cli import packed_files

from .conftest import ROOT


def test_the_packed_copy_builds_the_fab_of_the_project_folder() -> None:
    # Execute: Flower's own build, of the project folder (.venv and outputs inside) and of
    # the copy flwr run is handed
    with packed_files(ROOT) as copy:
        packed = build_fab_from_disk(copy)
        copied = {p.relative_to(copy).parts[0] for p in copy.rglob("*")}
    whole = build_fab_from_disk(ROOT)

    # Assert: byte for byte the same FAB, from a copy without the ignored folders, removed after
    assert packed == whole
    assert "sigmax_fl" in copied and "pyproject.toml" in copied
    assert not copied & {".venv", "outputs", ".git", ".flwr-home"}
    assert not copy.exists()


def test_ignored_folders_symlinks_and_unpacked_kinds_stay_out(tmp_path: Path) -> None:
    # Prepare: an app with an ignored folder, a symlink, a CSV (Flower packs no CSV) and code
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "venv" / "lib").mkdir(parents=True)
    (app / "pyproject.toml").write_text("[project]\nname = 'app'\n")
    (app / ".gitignore").write_text("venv/\n*.log\n")
    (app / "pkg" / "task.py").write_text("x = 1\n")
    (app / "pkg" / "run.log").write_text("noise\n")
    (app / "pkg" / "bars.csv").write_text("t,close\n")
    (app / "venv" / "lib" / "site.py").write_text("y = 2\n")
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "task.py")

    # Execute
    with packed_files(app) as copy:
        files = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())

    # Assert
    assert files == [".gitignore", "pkg/task.py", "pyproject.toml"]


def test_a_gitignore_that_re_includes_files_hands_over_the_folder_itself(tmp_path: Path) -> None:
    # A '!' pattern could bring back a file under an ignored folder: nothing is left out then
    (tmp_path / ".gitignore").write_text("build/\n!build/keep.py\n")
    with packed_files(tmp_path) as folder:
        assert folder == tmp_path
