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


def _app(folder: Path) -> Path:
    """An app with an ignored folder, a folder Flower always leaves out, a symlink, a CSV
    (Flower packs no CSV) and code; the project's own pyproject.toml."""
    app = folder / "app"
    for sub in ("pkg/__pycache__", "venv/lib", "pkg/data"):
        (app / sub).mkdir(parents=True)
    (app / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    (app / "pkg" / "task.py").write_text("x = 1\n")
    (app / "pkg" / "__pycache__" / "stale.py").write_text("z = 3\n")
    (app / "pkg" / "run.log").write_text("noise\n")
    (app / "pkg" / "bars.csv").write_text("t,close\n")
    (app / "pkg" / "data" / "meta.json").write_text("{}\n")
    (app / "venv" / "lib" / "site.py").write_text("y = 2\n")
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "task.py")
    return app


def test_ignored_folders_symlinks_and_unpacked_kinds_stay_out(tmp_path: Path) -> None:
    # Prepare
    app = _app(tmp_path)
    (app / ".gitignore").write_text("venv/\n*.log\n")

    # Execute
    with packed_files(app) as copy:
        files = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
        packed = build_fab_from_disk(copy)

    # Assert: only what Flower packs, into Flower's FAB of the folder
    assert files == [".gitignore", "pkg/data/meta.json", "pkg/task.py", "pyproject.toml"]
    assert packed == build_fab_from_disk(app)


def test_a_symlinked_gitignore_counts_for_nothing_as_with_flower(tmp_path: Path) -> None:
    # Prepare: Flower skips symlinked files, so it never reads this .gitignore
    app = _app(tmp_path)
    (tmp_path / "rules").write_text("data/\n")
    (app / ".gitignore").symlink_to(tmp_path / "rules")

    # Execute
    with packed_files(app) as copy:
        packed = build_fab_from_disk(copy)
        kept = (copy / "pkg" / "data" / "meta.json").is_file()

    # Assert
    assert kept and packed == build_fab_from_disk(app)


def test_a_gitignore_that_re_includes_files_hands_over_the_folder_itself(tmp_path: Path) -> None:
    # A '!' pattern could bring back a file under an ignored folder: nothing is left out then
    (tmp_path / ".gitignore").write_text("build/\n!build/keep.py\n")
    with packed_files(tmp_path) as folder:
        assert folder == tmp_path
