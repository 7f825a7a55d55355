"""Output folders that appear whole or not at all, and never at the cost of something the user keeps.

`check_output_folder` refuses, before any weights load, an output that is or holds the source model, the embedded
model's cache, the current or home folder, that cannot be written, or whose name leaves no room for its hidden
siblings' within the file system's limit. `atomic_folder` yields an empty staging
folder beside the output and moves it into place only once the body has finished; on any failure (a full disk, an
unwritable folder, Ctrl-C) the staging folder is removed and an existing output stays as it was. Work that must
write the output in place (the demo's fine-tuning run) goes through `replaced_when_done`, which sets the existing
output aside until the work completes. The writer of a staging, retired or set-aside folder holds a lock file
beside it, so that a later run on any machine sharing the folder can tell those of a killed run (the lock is free),
clean up the first and put the others back; one without a lock file (from an earlier linearize, or where nothing
can be locked) is a killed run's when the process id its name carries is not running on this machine. A single file
(a JSON record, a plot, a recipe) is written the same way through `file_written_whole`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.file_download import repo_folder_name
from safetensors import SafetensorError

from . import sources
from .errors import LinearizeError
from .locks import LockHeld, locked, taken

_STAGING = "linearize-tmp"  # the output being written
_RETIRED = "linearize-old"  # the output being replaced, between its two renames
_SET_ASIDE = "linearize-kept"  # the output being replaced by work that writes in place, while it runs
_LOCK = "linearize-lock"  # held by the writer of the sibling with the same process id and token (`_claimed`)
_SIBLINGS = (_STAGING, _RETIRED, _SET_ASIDE)
_LEFTOVER = re.compile(
    rf"^\.(?P<name>.+)\.(?P<kind>{'|'.join((*_SIBLINGS, _LOCK))})-(?P<pid>\d+)-(?P<token>[0-9a-f]{{8}})$"
)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# what replaces an existing output, named for both who reach these messages: a command's option, a library argument
FORCE = "--force (force=True)"
# the most a hidden sibling's name (`_sibling`, or its lock file's) adds to the output's: a process id has at most 7
# digits (pid_max)
_SIBLING_EXTRA = len(f"..-{2**22}-{0:08x}") + max(len(kind) for kind in (*_SIBLINGS, _LOCK))


def check_output_folder(out: Path, force: bool = False, source: str | None = None) -> None:
    """Refuse an output folder that would destroy something or cannot be written, whatever `force` says about an
    existing one. `source` is the model being converted (a folder or hub id; None for the embedded default)."""
    out = Path(out)
    _refuse_ancestor_of(out, Path.cwd(), "the current folder")
    _refuse_ancestor_of(out, Path.home(), "your home folder")
    if source is not None:
        _refuse_overlap(
            out,
            _source_folder(source),
            f"the source model '{source}'",
            "a conversion must not write into or over its source",
        )
    _refuse_overlap(
        out,
        sources.cache_root() / sources.EMBEDDED_NAME,
        "the embedded model's cache",
        f"later runs would silently use your output in place of the embedded {sources.EMBEDDED_NAME}",
    )
    check_name_length(_followed(out))
    check_replaceable(out, force)
    check_writable(out)


def check_replaceable(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"output path '{out}' is a file, not a folder; choose another output path")
    if out.exists() and not force:
        raise LinearizeError(f"output folder '{out}' already exists; pass {FORCE} to replace it")


def check_name_length(out: Path) -> None:
    """Refuse a name that the file system takes but whose hidden siblings' names (the output's name and up to
    `_SIBLING_EXTRA` bytes) it would not: the write would fail with 'File name too long' only once the work is done."""
    out = Path(out)
    size, limit = len(os.fsencode(out.name)), _name_max(out)
    if size + _SIBLING_EXTRA > limit:
        raise LinearizeError(
            f"output folder '{out}' has a name too long ({size} bytes): it is written through a hidden folder beside "
            f"it, whose name adds up to {_SIBLING_EXTRA} bytes, and the file system allows {limit} bytes in a name. "
            f"Choose a name of at most {limit - _SIBLING_EXTRA} bytes"
        )


def _name_max(out: Path) -> int:
    """The longest file name, in bytes, that the file system of `out`'s nearest existing folder allows."""
    existing = _absolute(out).parent
    while not existing.exists():
        existing = existing.parent
    with suppress(OSError, ValueError, AttributeError):  # AttributeError: no pathconf (Windows)
        return os.pathconf(existing, "PC_NAME_MAX")
    return 255


@contextmanager
def atomic_folder(out: Path, force: bool = False, elsewhere: str = "choose an output folder") -> Iterator[Path]:
    """Yield an empty staging folder beside `out`, and move it into place as `out` when the body completes (an
    existing `out` is replaced only with `force`). Write errors become LinearizeErrors that say what to do, with
    `elsewhere` (see `write_errors`)."""
    out = _followed(Path(out))
    check_name_length(out)
    check_replaceable(out, force)
    with write_errors(out, elsewhere):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out.parent)
        with _claimed(out, _STAGING) as staging:
            staging.mkdir()  # not tempfile.mkdtemp: its mode 0700 would outlive the move; mkdir follows the umask
            try:
                yield staging
                _follow_umask(staging)
                _move_into_place(staging, out, force)
            except BaseException:
                _remove(staging)
                raise


@contextmanager
def replaced_when_done(out: Path, force: bool = False) -> Iterator[None]:
    """For work that must write `out` in place (a fine-tuning run records its own folder): an existing `out` (only
    with `force`) is set aside while the body runs and deleted once it completes; if the body fails, what it wrote
    is removed and the old folder put back (if the process is killed, the next linearize run writing beside it
    does that)."""
    out = _followed(Path(out))
    check_name_length(out)
    with _held_for_writing(out), ExitStack() as claimed:
        check_replaceable(out, force)  # again, now that no other run can be writing it
        retired = None
        with write_errors(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(out.parent)
            if out.exists():
                retired = claimed.enter_context(_claimed(out, _SET_ASIDE))
                os.replace(out, retired)
        try:
            yield
        except BaseException:
            _remove(out)
            if retired is not None:
                os.replace(retired, out)
            raise
        if retired is not None:
            # renamed to a staging name first: a delete cut short must not leave a set-aside folder, which the next
            # run would put back over the completed output
            with _claimed(out, _STAGING) as doomed:
                os.replace(retired, doomed)
                _remove(doomed)


@contextmanager
def _held_for_writing(out: Path) -> Iterator[None]:
    """One in-place writer of `out` at a time: a second would set aside, or on failing delete, the folder the first
    writes into. The lock lives in linearize's cache, keyed by the absolute path, so that nothing is left beside
    `out`; where the cache cannot be written, the work runs unlocked rather than not at all."""
    key = hashlib.sha256(os.fsencode(_absolute(out))).hexdigest()[:32]
    with ExitStack() as held:
        try:
            held.enter_context(locked(sources.cache_root() / "locks" / f"{key}.lock"))
        except LockHeld as error:
            raise LinearizeError(
                f"output folder '{out}' is being written by another linearize run ({error.holder}); wait for it to "
                "finish, or choose another output folder"
            ) from None
        except OSError:  # a cache that cannot be written (a read-only home): unlocked, as on Windows
            pass
        yield


@contextmanager
def file_written_whole(path: Path) -> Iterator[Path]:
    """Yield a hidden sibling of `path` to write; it replaces `path` once the body has finished, so that a full disk,
    an error or Ctrl-C leaves the earlier file as it was (and no partial one). Each writer has its own sibling: two
    threads writing `path` at once would otherwise share one, and the later would find it gone."""
    path = _followed(Path(path).expanduser())  # as `check_writable` took it: a '~' the shell left (`--json=~/r.json`)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_file(path: Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all (`file_written_whole`)."""
    with file_written_whole(path) as partial:
        partial.write_text(text)
    return Path(path)


def _follow_umask(folder: Path) -> None:
    """Give the files in `folder` the mode the umask gives new files: writers that stage through a temporary file
    (transformers' safetensors save) leave theirs at 0600, which teammates on a shared machine cannot read. Best
    effort: a file system that refuses chmod keeps the modes it gave."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with suppress(OSError):
                path.chmod(mode)


def _umask() -> int:
    """The process's umask: read where Linux shows it, since setting it to read it back is not thread-safe."""
    with suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def remove_leftovers(parent: Path) -> None:
    """Remove the staging folders in `parent` of linearize runs that were killed, and put back an output that one
    killed between its two renames had retired, or that one killed while writing in place had set aside (over what
    it had written), saying so in one line each; then their lock files. A run writing there from another machine
    holds its lock: what it writes is left alone, whatever its process id means here."""
    for path in parent.iterdir():
        match = _LEFTOVER.match(path.name)
        # `.NAME.linearize-...` names NAME; a NAME of "." or ".." is this folder or its parent, no output of ours
        if match is None or match["name"] in (".", ".."):
            continue
        lock_file = _named(path, match, _LOCK)
        with taken(lock_file) as free:
            if match["kind"] == _LOCK:
                _remove_lock_file_left(lock_file, match, free)
            # None: no lock to ask (no lock file, from an earlier linearize; or nothing here can be locked)
            elif free or (free is None and not _process_alive(int(match["pid"]))):
                _clean_up(path, match)
                if not os.path.lexists(path):
                    with suppress(OSError):
                        lock_file.unlink(missing_ok=True)


def _clean_up(path: Path, match: re.Match) -> None:
    """Remove `path`, a killed run's sibling, or put it back as the output it names."""
    if not os.path.lexists(path):  # its writer moved it into place or removed it since `parent` was listed
        return
    original = path.parent / match["name"]
    if (match["kind"] == _RETIRED and not original.exists()) or match["kind"] == _SET_ASIDE:
        with suppress(OSError):  # another user's leftover, say: not ours to touch, and no reason to stop
            if match["kind"] == _SET_ASIDE:
                _remove(original)  # the killed run's incomplete output
            os.replace(path, original)
            _note(f"Restored '{original}' from '{path.name}', left by a linearize run killed while replacing it.")
        return
    _remove(path)
    if not path.exists():
        _note(f"Removed '{path}', left by a linearize run that was killed (process {match['pid']} is gone).")


def _remove_lock_file_left(lock_file: Path, match: re.Match, free: bool | None) -> None:
    """Remove a lock file taken (`free`) whose sibling is gone: its writer was killed before making the sibling or
    before removing the file once it had moved or removed the sibling. An empty one may be one that its writer has
    just made and not yet locked (`locked` writes who holds it once it does): it is kept."""
    siblings = [_named(lock_file, match, kind) for kind in _SIBLINGS]
    with suppress(OSError):  # another user's: not ours to remove
        if free and lock_file.stat().st_size and not any(os.path.lexists(sibling) for sibling in siblings):
            lock_file.unlink()


def _refuse_ancestor_of(out: Path, folder: Path, what: str) -> None:
    folder = _absolute(folder)
    relation = _relation(_absolute(out), folder)
    if relation in ("is", "contains"):
        raise LinearizeError(
            f"output folder '{out}' {relation} {what} ({folder}): replacing it would delete everything in it. Name "
            f"a new folder for the output, e.g. -o ./converted-model"
        )


def _refuse_overlap(out: Path, folder: Path, what: str, harm: str) -> None:
    folder = _absolute(folder)
    relation = _relation(_absolute(out), folder)
    if relation is not None:
        raise LinearizeError(
            f"output folder '{out}' {relation} {what} ({folder}): {harm}. Choose an output folder outside it; "
            f"{FORCE} does not change this"
        )


def _relation(target: Path, folder: Path) -> str | None:
    if target == folder:
        return "is"
    if target in folder.parents:
        return "contains"
    if folder in target.parents:
        return "lies inside"
    return None


def _source_folder(source: str) -> Path:
    """Where the source model's files are: its folder, or for a hub id its folder in the Hugging Face cache."""
    local = Path(source).expanduser()
    if local.exists():
        return local
    try:
        return Path(hub_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=source, repo_type="model")
    except HFValidationError:  # not a hub id either: `convert` will say the folder does not exist
        return local


def check_writable(out: Path, written_into: bool = False, what: str = "output folder") -> None:
    """Refuse `out` when the nearest existing folder it is written from is a file or cannot be written: its parent
    for an output that is created or replaced by a rename, `out` itself when it exists and is `written_into` (a run
    folder). `what` names it in the message."""
    existing = _absolute(out) if written_into else _absolute(out).parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LinearizeError(f"cannot create {what} '{out}': '{existing}' is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        reason = "it is on a read-only file system" if read_only else "you do not have permission to write there"
        raise LinearizeError(f"cannot write {what} '{out}': {reason} ({existing}). Choose a folder you can write to")


@contextmanager
def write_errors(out: Path, elsewhere: str = "choose an output folder") -> Iterator[None]:
    """Turn a failed write into `out` (a folder) into a LinearizeError that names the cause and what to do:
    `elsewhere`, how to write it somewhere else (a cache is moved by its variable, not by an output option)."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        kept = f"; the existing '{out}' is unchanged" if out.exists() else ""
        if getattr(error, "errno", None) in _DISK_FULL or "No space left on device" in str(error):
            raise LinearizeError(
                f"the disk is full: no space left on the device of '{_absolute(out).parent}' while writing '{out}'. "
                f"No partial output was left{kept}. Free some space or {elsewhere} on another disk"
            ) from None
        reason = error
        if isinstance(error, OSError) and error.strerror:  # a write to an open file names none
            reason = error.strerror + (f" ({error.filename})" if error.filename else "")
        raise LinearizeError(
            f"could not write output folder '{out}': {reason}. No partial output was left{kept}. Check that "
            f"you can write to '{_absolute(out).parent}', or {elsewhere} elsewhere"
        ) from None


def _move_into_place(staging: Path, out: Path, force: bool) -> None:
    """Rename `staging` to `out`. Another run into the same output may have moved its own there since this one
    started (two `convert -o SAME` at once), even between the look and the rename: only `force` replaces it."""
    if not out.exists():
        try:
            os.replace(staging, out)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if not force:
        raise LinearizeError(
            f"output folder '{out}' already exists: another run saved it while this one was writing. It is kept and "
            f"this run's output discarded; pass {FORCE} to replace it, or choose another output folder"
        )
    with _claimed(out, _RETIRED) as retired:
        os.replace(out, retired)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(retired, out)
            raise
        _remove(retired)


def _followed(out: Path) -> Path:
    """Where `out` is written: the path a link there points to (a folder on a bigger disk, say), so that the output
    replaces what the link names and the link stays. Renaming into the link's own place would replace the link,
    write to its disk and leave the linked folder as it was; a link to nothing would fail with 'Not a directory'."""
    return _absolute(out) if out.is_symlink() else out


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def _claimed(out: Path, kind: str) -> Iterator[Path]:
    """Yield a new name for a hidden sibling of `out`, whose lock file (`_lock_of`) this process holds for the block:
    while it does, no run on any machine sharing the folder takes what the block writes there for a killed run's
    (a process id tells only this machine). The lock file is made before the sibling and removed once the sibling
    is gone (moved into place or removed), after the lock is released; the name is this sibling's alone, so no other
    writer can be waiting on it. If the sibling stays, so does the file, free for the next run to take."""
    sibling = _sibling(out, kind)
    lock_file = _lock_of(sibling)
    try:
        with locked(lock_file, wait=lambda holder: None):  # `remove_leftovers` may hold it for a moment
            yield sibling
    finally:
        if not os.path.lexists(sibling):
            with suppress(OSError):  # a lock file left is removed by the next run writing here
                lock_file.unlink(missing_ok=True)


def _lock_of(sibling: Path) -> Path:
    """The lock file held by the writer of a hidden sibling: the sibling's name, with `_LOCK` for its kind."""
    return _named(sibling, _LEFTOVER.match(sibling.name), _LOCK)


def _named(path: Path, match: re.Match, kind: str) -> Path:
    """The hidden sibling of `kind` with the output name, process id and token of `path` (`match`, its name's)."""
    return path.with_name(f".{match['name']}.{kind}-{match['pid']}-{match['token']}")


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: keep what we cannot check
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def delete_folder(path: Path) -> None:
    """Delete `path` (if it exists) as a whole: renamed out of the way first, so a delete cut short leaves a staging
    leftover, which the next linearize run writing beside it removes, and never a half-deleted `path`. One already
    gone (deleted by hand since it was listed) is no error."""
    if not os.path.lexists(path):  # nothing to delete: no lock file beside it, nor a folder made for one
        return
    with _claimed(path, _STAGING) as doomed:
        try:
            os.replace(path, doomed)
        except FileNotFoundError:  # not `path.exists()` first: it may go between the look and the rename
            return
        _remove(doomed)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _absolute(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def _note(message: str) -> None:
    print(message, file=sys.stderr)
