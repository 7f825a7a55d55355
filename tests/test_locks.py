"""`taken`: whether a lock file's holder is still there, told by its lock rather than by a process id."""

import linearize.locks
from linearize.locks import locked, taken


def test_a_lock_is_taken_only_when_free_and_a_missing_file_is_not_made(tmp_path):
    lock_file = tmp_path / "lock"
    with taken(lock_file) as free:
        assert free is None and not lock_file.exists()
    with locked(lock_file), taken(lock_file) as free:  # another open file description: as another process
        assert free is False
    with taken(lock_file) as free:
        assert free is True
        with taken(lock_file) as again:
            assert again is False


def test_without_fcntl_a_lock_tells_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(linearize.locks, "fcntl", None)
    (tmp_path / "lock").write_text("process 1 on host-b\n")
    with taken(tmp_path / "lock") as free:
        assert free is None
