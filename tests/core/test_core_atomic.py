"""Atomic output directories: what the user has is never lost.

A destination overlapping its source is refused; of two writers racing for one
destination exactly one wins and the other fails without touching the winner's
output; a failed ``overwrite`` leaves the old destination as it was.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from plugtron._atomic import atomic_output_dir, check_destination, rename_no_replace
from plugtron.errors import OutputError


@pytest.mark.parametrize("where, words", [
    (lambda src: src, "is the source"),
    (lambda src: src / "inside", "lies inside the source"),
    (lambda src: src.parent, "contains the source"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_destination_overlapping_the_source_is_refused(tmp_path: Path, where, words: str, overwrite: bool) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights").write_text("the only copy")
    with pytest.raises(OutputError, match=words):
        with atomic_output_dir(where(src), overwrite=overwrite, sources=[src]):
            pytest.fail("the block must not run")
    assert (src / "weights").read_text() == "the only copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_link_to_the_source_is_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "alias").symlink_to(src)
    with pytest.raises(OutputError, match="is the source"):
        check_destination(tmp_path / "alias", sources=[src], overwrite=True)


def test_two_writers_racing_for_one_destination_exactly_one_wins(tmp_path: Path) -> None:
    """Both pass the early check; the first to publish wins, the second fails and removes only its own temp dir."""
    dst = tmp_path / "out"
    both_inside = threading.Barrier(2)
    first_done = threading.Event()
    results: dict[str, object] = {}

    def writer(name: str, wait_for_first: bool) -> None:
        try:
            with atomic_output_dir(dst) as tmp:
                (tmp / "who").write_text(name)
                both_inside.wait(timeout=10)
                if wait_for_first:
                    first_done.wait(timeout=10)
            results[name] = "published"
        except OutputError as exc:
            results[name] = exc
        finally:
            if not wait_for_first:
                first_done.set()

    threads = [threading.Thread(target=writer, args=("first", False)), threading.Thread(target=writer, args=("second", True))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results["first"] == "published"
    assert isinstance(results["second"], OutputError) and "created by someone else" in str(results["second"])
    assert (dst / "who").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rename_no_replace_refuses_even_an_empty_directory(tmp_path: Path) -> None:
    """A plain rename(2) silently replaces an empty directory; the publishing rename must not."""
    (tmp_path / "new").mkdir()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / "new", tmp_path / "taken")
    assert (tmp_path / "new").is_dir()


def test_a_failed_overwrite_keeps_the_old_destination(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("previous result")
    with pytest.raises(OutputError, match="No space left on device; nothing was written"):
        with atomic_output_dir(dst, overwrite=True) as tmp:
            (tmp / "half").write_text("half written")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in dst.iterdir()) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_unwritable_parent_is_one_error_naming_the_destination(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match="cannot create the output") as info:
        with atomic_output_dir(blocker / "out"):
            pytest.fail("the block must not run")
    assert str(blocker / "out") in str(info.value)
