"""Bad input and faults, as a hostile or unlucky user meets them through the command line: every case ends in one
clear line and an exit code, with the inputs' bytes unchanged and no stray file (issue 9).

Each test checks the message, the exit code, the inputs' sha256 before and after, and that the folder holds
exactly what it should (no temporary file, no partial output, no cache file left by a refused job).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lib_rebasin import outputs
from lib_rebasin.checkpoint import Checkpoint, save_state_dict
from lib_rebasin.cli import main
from lib_rebasin.host.base import scan_checkpoints
from lib_rebasin.outputs import TEMP_SUFFIX, OutputError, OutputFile

ROOT = Path(__file__).resolve().parents[1]


# --- helpers ----------------------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class Models:
    """A models folder holding hard links of the session's tiny pair as A and B."""

    def __init__(self, folder: Path, a: Path, b: Path):
        self.dir = folder
        self.a, self.b = folder / "A.safetensors", folder / "B.safetensors"
        for source, target in ((a, self.a), (b, self.b)):
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        self.inputs = [self.a, self.b]
        self.before = {p.name: sha256(p) for p in self.inputs}

    def check(self, *new: str) -> None:
        """Inputs intact, and the folder holds exactly the inputs plus `new` (no temp, no partial output)."""
        assert {p.name: sha256(p) for p in self.inputs} == self.before
        names = sorted(p.name for p in self.dir.iterdir())
        assert names == sorted([p.name for p in self.inputs] + list(new))


@pytest.fixture
def models(tmp_path, tiny_a, tiny_b) -> Models:
    folder = tmp_path / "models"
    folder.mkdir()
    return Models(folder, Path(tiny_a), Path(tiny_b))


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def spawn(*args, cwd: Path | None = None, **options) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "lib_rebasin", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def small_file(path: Path, value: float = 1.0) -> Path:
    return save_state_dict(path, {"w": torch.full((4, 4), value), "b": torch.zeros(4)})


# --- outputs that must never be written -----------------------------------------------------------------------

def test_report_naming_an_input_is_refused_before_any_work(capsys, models):
    code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", models.dir / "out.safetensors",
                       "--report", models.a, "-q")
    assert code == 2
    assert "A.safetensors: is an input of this job" in one_line_error(err)
    models.check()  # no output, no permutation cache: refused before matching


def test_merge_many_report_naming_an_input_is_refused(capsys, models):
    code, _, err = cli(capsys, "merge-many", models.a, models.b, "-o", models.dir / "out.safetensors",
                       "--report", models.b, "--overwrite", "-q")
    assert code == 2
    assert "B.safetensors: is an input of this job" in one_line_error(err)
    models.check()


def test_report_with_a_checkpoint_extension_is_refused(capsys, models):
    out = models.dir / "out.safetensors"
    code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", out, "--report", out, "-q")
    assert code == 2
    assert "must not end in .safetensors (the webui would list it as a model)" in one_line_error(err)
    models.check()


def test_chart_and_report_on_one_file_are_refused(capsys, models):
    same = models.dir / "r.png"
    code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", models.dir / "out.safetensors",
                       "--report", same, "--chart", same, "-q")
    assert code == 2
    assert "the same file as --report" in one_line_error(err)
    models.check()


def test_chart_on_a_hard_link_of_an_input_is_refused_even_with_overwrite(capsys, models):
    alias = models.dir / "A.png"
    os.link(models.a, alias)
    code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", models.dir / "out.safetensors",
                       "--chart", alias, "--overwrite", "-q")
    assert code == 2
    assert f"A.png: is an input of this job ({models.a})" in one_line_error(err)
    models.check("A.png")


def test_existing_report_is_kept_without_overwrite(capsys, models):
    report = models.dir / "report.json"
    report.write_text("precious")
    code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", models.dir / "out.safetensors",
                       "--report", report, "-q")
    assert code == 2
    assert "report.json: already exists" in one_line_error(err)
    assert report.read_text() == "precious"
    models.check("report.json")


def test_report_and_chart_are_written_through_the_guard(capsys, models):
    code, out, err = cli(capsys, "rebasin", models.a, models.b, "-o", models.dir / "out.safetensors",
                         "--report", models.dir / "r.json", "--no-cache", "-q")
    assert code == 0, err
    report = json.loads((models.dir / "r.json").read_text())
    assert report["matching"]["changed_groups"] is not None
    models.check("out.safetensors", "r.json")


@pytest.mark.parametrize("alias", ["symlink", "hardlink", "relative"])
def test_output_that_is_an_input_by_another_path_is_refused(capsys, models, alias, monkeypatch):
    if alias == "symlink":
        target = models.dir / "link.safetensors"
        os.symlink(models.a, target)
        extra = ["link.safetensors"]
    elif alias == "hardlink":
        target = models.dir / "hard.safetensors"
        os.link(models.a, target)
        extra = ["hard.safetensors"]
    else:
        (models.dir / "sub").mkdir()
        monkeypatch.chdir(models.dir)
        target = Path("sub") / ".." / "A.safetensors"
        extra = ["sub"]
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", target, "--overwrite", "-q")
    assert code == 2
    assert "is an input of this job" in one_line_error(err)
    models.check(*extra)


def test_output_that_is_a_folder_is_refused_before_any_work(capsys, models):
    (models.dir / "dir.safetensors").mkdir()
    code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", models.dir / "dir.safetensors",
                       "--overwrite", "-q")
    assert code == 2
    assert "dir.safetensors: is a folder: give a file name" in one_line_error(err)
    models.check("dir.safetensors")
    assert list((models.dir / "dir.safetensors").iterdir()) == []


def test_output_in_a_missing_folder_is_refused(capsys, models):
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", models.dir / "nope" / "out.safetensors", "-q")
    assert code == 2
    assert "nope: folder does not exist" in one_line_error(err)
    models.check()


def test_output_name_too_long_for_the_file_system(capsys, models):
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", models.dir / ("x" * 300 + ".safetensors"), "-q")
    assert code == 2
    assert "file name too long" in one_line_error(err)
    models.check()


def test_a_pipe_is_neither_read_nor_replaced(capsys, models):
    fifo = models.dir / "pipe.safetensors"
    os.mkfifo(fifo)
    code, _, err = cli(capsys, "inspect", fifo)  # would block forever if opened
    assert code == 2 and "not a regular file" in one_line_error(err)
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", fifo, "--overwrite", "-q")
    assert code == 2 and "is not a regular file" in one_line_error(err)
    models.check("pipe.safetensors")


# --- inputs that are not what they seem ------------------------------------------------------------------------

def test_folder_as_input_says_so(capsys, models):
    (models.dir / "folder.safetensors").mkdir()
    for command in (["inspect"], ["amp", models.a]):
        code, _, err = cli(capsys, *command, models.dir / "folder.safetensors", "-o" if command != ["inspect"]
                           else "--json", *([models.dir / "out.safetensors"] if command != ["inspect"] else []))
        assert code == 2
        assert "folder.safetensors: is a folder, not a checkpoint file" in one_line_error(err)
    models.check("folder.safetensors")


def _with_metadata(path: Path, metadata) -> Path:
    header = json.dumps({"__metadata__": metadata, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    raw = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 8)
    return path


@pytest.mark.parametrize("metadata, kind", [([1, 2], "list"), ("text", "string"), (7, "number")])
@pytest.mark.parametrize("command", ["inspect", "spec", "amp", "rebasin"])
def test_metadata_that_is_not_an_object_is_a_clear_error_in_every_command(capsys, tmp_path, models, metadata, kind,
                                                                          command):
    bad = _with_metadata(models.dir / "bad.safetensors", metadata)
    models.inputs.append(bad)
    models.before[bad.name] = sha256(bad)
    args = [bad] if command in ("inspect", "spec") else [bad, models.b, "-o", models.dir / "out.safetensors"]
    code, _, err = cli(capsys, command, *args)
    assert code == 2
    assert f"bad.safetensors: corrupt safetensors header: __metadata__ is a JSON {kind}" in one_line_error(err)
    models.check()


def test_legacy_ckpt_of_tensors_merges_like_its_safetensors(capsys, models, tiny_a):
    with Checkpoint(tiny_a) as ckpt:
        tensors = {k: ckpt.get(k).clone() for k in ckpt.keys()}
    legacy = models.dir / "A.ckpt"
    torch.save({"state_dict": tensors}, legacy, _use_new_zipfile_serialization=False)
    assert legacy.read_bytes()[:1] == b"\x80"  # the pre-1.6 pickle format, not a zip
    code, _, err = cli(capsys, "amp", legacy, models.b, "-o", models.dir / "from_ckpt.safetensors", "-q")
    assert code == 0, err
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", models.dir / "from_st.safetensors", "-q")
    assert code == 0, err
    with Checkpoint(models.dir / "from_ckpt.safetensors") as x, Checkpoint(models.dir / "from_st.safetensors") as y:
        assert x.keys() == y.keys()
        assert all(torch.equal(x.get(k), y.get(k)) for k in x.keys())
    models.check("A.ckpt", "from_ckpt.safetensors", "from_st.safetensors")


def test_renamed_files_are_read_by_their_content(capsys, tmp_path):
    zipped = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.ones(2)}, zipped)
    code, _, err = cli(capsys, "inspect", zipped)
    assert code == 2
    assert "pickle.safetensors: not a safetensors file: it holds a PyTorch pickle" in one_line_error(err)
    renamed = tmp_path / "really_safetensors.ckpt"
    shutil.copyfile(small_file(tmp_path / "x.safetensors"), renamed)
    with Checkpoint(renamed) as ckpt:
        assert torch.equal(ckpt.get("w"), torch.ones(4, 4))


def test_garbage_named_ckpt_is_corrupt_not_unsafe(capsys, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    code, _, err = cli(capsys, "inspect", garbage)
    assert code == 2
    assert "garbage.ckpt: corrupt or not a checkpoint" in one_line_error(err)


# --- the operating system says no ------------------------------------------------------------------------------

def _nobody_can_run_python() -> bool:
    try:
        return subprocess.run([sys.executable, "-c", "pass"], capture_output=True, user=65534, group=65534,
                              extra_groups=[], timeout=60).returncode == 0
    except OSError:
        return False


def _as_unprivileged_user(capsys, tmp_path, *args) -> tuple[int, str] | None:
    """Run the CLI where permission bits apply: in this process when we are not root, else as `nobody` (root
    reads and writes through any permission bits); None if neither is possible here."""
    if os.name == "nt":
        return None
    if os.geteuid() != 0:
        code, _, err = cli(capsys, *args)
        return code, err
    if not _nobody_can_run_python():
        return None
    for part in [tmp_path, *tmp_path.parents]:
        if part != Path("/"):
            os.chmod(part, os.stat(part).st_mode | 0o011)  # let `nobody` reach the test's folder
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    os.chmod(cache, 0o777)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LIB_REBASIN_CACHE_DIR=str(cache), HOME=str(cache))
    process = subprocess.run([sys.executable, "-m", "lib_rebasin", *map(str, args)], cwd=tmp_path,
                             capture_output=True, text=True, env=env, user=65534, group=65534, extra_groups=[])
    return process.returncode, process.stderr


def test_unreadable_input_is_one_line(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    os.chmod(folder, 0o777)
    a, b = small_file(folder / "a.safetensors"), small_file(folder / "b.safetensors", 2.0)
    os.chmod(b, 0o644)
    os.chmod(a, 0)
    before = sha256(a)
    args = ("amp", a, b, "-o", folder / "out.safetensors", "-q")
    result = _as_unprivileged_user(capsys, tmp_path, *args)
    if result is None:  # root, and no other user can run this Python: raise what open() raises for them
        real_open = open

        def denied(file, *rest, **kwargs):
            if str(file) == str(a):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *rest, **kwargs)
        monkeypatch.setattr("builtins.open", denied)
        code, _, err = cli(capsys, *args)
        monkeypatch.undo()
        result = code, err
    code, err = result
    assert code == 2, err
    assert f"{a}: permission denied: this user cannot read it" in one_line_error(err)
    assert sha256(a) == before and sorted(p.name for p in folder.iterdir()) == ["a.safetensors", "b.safetensors"]


def _pair_for_others(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "m"
    folder.mkdir()
    a, b = small_file(folder / "a.safetensors"), small_file(folder / "b.safetensors", 2.0)
    for path in (folder, a, b):
        os.chmod(path, 0o755 if path == folder else 0o644)
    return a, b


def test_output_folder_without_write_permission_is_refused_before_any_work(capsys, tmp_path):
    a, b = _pair_for_others(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    result = _as_unprivileged_user(capsys, tmp_path, "amp", a, b, "-o", locked / "out.safetensors", "-q")
    if result is None:
        pytest.skip("as root, permission bits do not apply, and no other user can run this Python")
    code, err = result
    assert code == 2, err
    assert f"{locked}: permission denied: cannot write here" in one_line_error(err)
    assert list(locked.iterdir()) == []


def test_read_only_file_system_is_refused_before_any_work(capsys, tmp_path, models):
    locked = tmp_path / "ro"
    locked.mkdir()
    if os.name == "nt" or os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only file system")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount here: {mounted.stderr.decode().strip()}")
    try:
        code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", locked / "out.safetensors", "-q")
        assert code == 2
        assert f"{locked}: read-only file system: choose an output folder on a writable disk" in one_line_error(err)
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["umount", str(locked)], check=False)
    models.check()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (root only): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.name == "nt" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_too_small_is_refused_before_writing(capsys, models, small_tmpfs):
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", small_tmpfs / "out.safetensors", "-q")
    assert code == 2
    assert "out.safetensors: not enough free disk space" in one_line_error(err)
    assert list(small_tmpfs.iterdir()) == []
    models.check()


def test_disk_filling_up_mid_write_leaves_nothing(capsys, models, small_tmpfs, monkeypatch):
    # The free-space check passes (another program frees space, then takes it back): the disk really fills up.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 10**12))
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", small_tmpfs / "out.safetensors", "-q")
    assert code == 2
    assert "out.safetensors: the disk is full: free some space or choose another folder" in one_line_error(err)
    assert list(small_tmpfs.iterdir()) == []
    models.check()


class _FullDisk:
    """os.fdopen for the guard's temporary files whose writes fail with ENOSPC after `room` bytes."""

    def __init__(self, room: int, only: str = ""):
        self.room, self.only, self.real = room, only, os.fdopen

    def __call__(self, fd, *args, **kwargs):
        file = self.real(fd, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if self.only not in name:
            return file
        room = self.room

        class Limited:
            def __getattr__(self, attr):
                return getattr(file, attr)

            def write(self, data):
                nonlocal room
                if room <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                n = file.write(memoryview(data)[:room])
                room -= n
                return n
        return Limited()


def test_full_disk_mid_write_keeps_the_existing_output_when_overwriting(capsys, models, monkeypatch):
    out = models.dir / "out.safetensors"
    out.write_bytes(b"the previous merge")
    monkeypatch.setattr(outputs.os, "fdopen", _FullDisk(room=1 << 20))
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", out, "--overwrite", "-q")
    assert code == 2
    assert "out.safetensors: the disk is full" in one_line_error(err)
    assert out.read_bytes() == b"the previous merge"
    models.check("out.safetensors")


def test_permutation_cache_that_cannot_be_written_costs_only_a_warning(capsys, models, monkeypatch):
    monkeypatch.setattr(outputs.os, "fdopen", _FullDisk(room=1000, only=".rebasin-perms"))
    code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", models.dir / "out.safetensors", "-q")
    assert code == 0, err
    assert "warning: permutation cache not written" in err and "the disk is full" in err
    models.check("out.safetensors")  # the merge, and no partial cache file


# --- concurrent writers ---------------------------------------------------------------------------------------

def _race(path: Path, monkeypatch=None) -> list:
    """Two writers of one name, both past their checks before either commits."""
    both_open = threading.Barrier(2)
    results: list = [None, None]

    def writer(i: int) -> None:
        try:
            out = OutputFile(path, size=10)
            with out:
                out.write(f"writer {i}".encode())
                both_open.wait()
                if i == 1:
                    time.sleep(0.2)  # let writer 0 commit first
            results[i] = "ok"
        except OutputError as e:
            results[i] = str(e)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("filesystem", ["hard links", "no hard links (renameat2)", "no hard links, no renameat2"])
def test_second_writer_of_one_name_fails_instead_of_replacing(tmp_path, monkeypatch, filesystem):
    if filesystem != "hard links":
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(outputs.os, "link", no_link)
    if filesystem == "no hard links, no renameat2":
        monkeypatch.setattr(outputs, "_renameat2", lambda: None)
    path = tmp_path / "same.safetensors"
    results = _race(path)
    assert results[0] == "ok"
    assert "same.safetensors: appeared while this job ran" in results[1]
    assert path.read_bytes() == b"writer 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.safetensors"]


def test_two_cli_merges_to_one_name_never_both_succeed(models):
    out = models.dir / "same.safetensors"
    runs = [spawn("amp", models.a, models.b, "-o", out, "-q"),
            spawn("weighted-sum", models.a, models.b, "--alpha", "0.3", "-o", out, "-q")]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "same.safetensors: " in loser and ("already exists" in loser or "appeared while this job ran" in loser)
    assert "Traceback" not in loser
    winner = "amp" if results[0][0] == 0 else "weighted-sum"
    with Checkpoint(out) as ckpt:
        assert json.loads(ckpt.metadata["sd_merge_recipe"])["method"] == winner
    models.check("same.safetensors")


# --- signals and kills ----------------------------------------------------------------------------------------

def _wait_for_temp(folder: Path, process: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = temps(folder)
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("no temporary file appeared")


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("signum, code, says", [(signal.SIGTERM, 143, "interrupted by SIGTERM"),
                                                 (signal.SIGHUP, 129, "interrupted by SIGHUP (the terminal was closed)"),
                                                 (signal.SIGINT, 130, "interrupted by Ctrl-C")])
def test_signal_mid_write_removes_the_temporary_file(tmp_path, signum, code, says):
    process = spawn("make-synthetic", tmp_path / "big.safetensors", "--scale", "small")
    _wait_for_temp(tmp_path, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert f"{says}: no output was written" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_temporary_file_of_a_killed_run_is_recognised_never_listed_and_cleaned_next_time(tmp_path, models):
    process = spawn("make-synthetic", models.dir / "big.safetensors", "--scale", "small")
    left = _wait_for_temp(models.dir, process)
    process.kill()
    process.wait()
    assert left.exists() and left.name.startswith(".big.safetensors.") and left.name.endswith(TEMP_SUFFIX)
    assert os.path.splitext(left.name)[1] not in (".safetensors", ".ckpt")  # A1111 and Forge list by extension
    listed = scan_checkpoints(str(models.dir)).values()
    assert str(left) not in listed and str(models.a) in listed
    assert outputs.stale_temps(models.dir) == [left]
    code = main(["amp", str(models.a), str(models.b), "-o", str(models.dir / "next.safetensors"), "-q"])
    assert code == 0
    models.check("next.safetensors")


def test_only_temporary_files_of_ended_processes_are_cleaned(tmp_path):
    host = outputs._host()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = {
        "mine": f".x.safetensors.{host}~{os.getpid()}~0123abcd{TEMP_SUFFIX}",
        "dead": f".x.safetensors.{host}~{dead.stdout.strip()}~0123abcd{TEMP_SUFFIX}",
        "foreign_recent": f".x.safetensors.otherbox~1~0123abcd{TEMP_SUFFIX}",
        "foreign_old": f".y.safetensors.otherbox~1~0123abcd{TEMP_SUFFIX}",
        "not_ours": ".x.safetensors.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    old = time.time() - outputs.FOREIGN_TEMP_AGE - 60
    os.utime(tmp_path / names["foreign_old"], (old, old))
    removed = outputs.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["foreign_old"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["mine"], names["foreign_recent"],
                                                                 names["not_ours"]])


def _wait_for_handlers(process: subprocess.Popen, timeout: float = 60) -> None:
    """Until the CLI has its SIGTERM handler (it installs it before importing torch)."""
    bit = 1 << (signal.SIGTERM - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{process.pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        if caught & bit:
            return
        time.sleep(0.005)
    raise AssertionError("the CLI never installed its signal handlers")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_during_start_up_is_clean(tmp_path, signum, code):
    a = small_file(tmp_path / "a.safetensors")
    process = spawn("inspect", a)
    _wait_for_handlers(process)
    process.send_signal(signum)  # while torch is still being imported
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err and "no output was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_closed_stdout_is_not_a_traceback(tmp_path):
    a = small_file(tmp_path / "a.safetensors")
    process = spawn("inspect", a, "--json")
    process.stdout.close()  # like `| head -c 0`
    err = process.stderr.read()
    process.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert process.returncode in (0, 141)


def test_output_too_big_for_a_fat32_disk_is_refused_before_any_work(capsys, models, monkeypatch):
    # A tiny merge stands in for a 6.9 GB one: the limit shrinks with it (no FAT32 disk can be mounted here).
    monkeypatch.setattr(outputs, "FAT_FILE_LIMIT", 1 << 20)
    monkeypatch.setattr(outputs, "file_system_type", lambda folder: "vfat")
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", models.dir / "out.safetensors", "-q")
    assert code == 2
    assert "out.safetensors: the output needs" in one_line_error(err)
    assert "which holds at most 4 GiB per file: write to an NTFS, exFAT or ext4 disk" in err
    models.check()


def test_rebasin_checks_its_output_before_hashing_and_matching(capsys, models, monkeypatch):
    import lib_rebasin.rebasin as rebasin

    def never(*args, **kwargs):
        raise AssertionError("expensive work ran before the output's checks")
    monkeypatch.setattr(rebasin, "_hashes", never)
    monkeypatch.setattr(rebasin, "match", never)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    for command in (["rebasin", models.a, models.b], ["merge-many", models.a, models.b]):
        code, _, err = cli(capsys, *command, "-o", models.dir / "out.safetensors", "-q")
        assert code == 2
        assert "out.safetensors: not enough free disk space" in one_line_error(err)
    monkeypatch.undo()
    monkeypatch.setattr(rebasin, "_hashes", never)
    monkeypatch.setattr(outputs, "FAT_FILE_LIMIT", 1 << 20)
    monkeypatch.setattr(outputs, "file_system_type", lambda folder: "vfat")
    code, _, err = cli(capsys, "amp-rebasin", models.a, models.b, "-o", models.dir / "out.safetensors", "-q")
    assert code == 2 and "FAT file system (vfat)" in one_line_error(err)
    models.check()  # no permutation cache either


def test_file_system_type_is_read_from_the_mount_table(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/mounts")
    with open("/proc/self/mounts") as f:
        root_type = next(line.split()[2] for line in f if line.split()[1] == "/")
    assert outputs.file_system_type("/") == root_type
    assert outputs.file_system_type("/proc/self") == "proc"


def test_input_rewritten_during_the_merge_discards_the_result(capsys, models, monkeypatch):
    from lib_rebasin import jobs
    from lib_rebasin.progress import Monitor
    changed = []

    def rewrite_b(fraction: float, message: str) -> None:
        if fraction > 0.3 and not changed:  # another program writes B (same size, new time) mid-merge
            os.utime(models.b, ns=(time.time_ns(), time.time_ns() + 10**9))
            changed.append(True)
    request = jobs.MergeRequest("amp", [str(models.a), str(models.b)], str(models.dir / "out.safetensors"))
    with pytest.raises(OutputError, match=r"B\.safetensors: changed while this job read it .* out\.safetensors "
                                          r"was not written"):
        jobs.run(request, Monitor(on_progress=rewrite_b))
    assert changed
    models.check()


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_signal_during_the_commit_is_held_until_the_file_is_in_place(capsys, models, monkeypatch):
    real_link = os.link

    def link_while_signalled(source, target):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives between the checks and the rename
        real_link(source, target)
    monkeypatch.setattr(outputs.os, "link", link_while_signalled)
    out = models.dir / "out.safetensors"
    code, _, err = cli(capsys, "amp", models.a, models.b, "-o", out, "-q")
    assert code == 143
    assert f"interrupted by SIGTERM: wrote {out} before that; nothing else was written" in err
    with Checkpoint(out) as ckpt:  # complete and valid
        assert len(ckpt.keys()) > 100
    models.check("out.safetensors")


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_second_signal_during_cleanup_stops_at_once_without_leftovers(tmp_path):
    process = spawn("make-synthetic", tmp_path / "big.safetensors", "--scale", "small")
    _wait_for_temp(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_symbolic_link_is_never_replaced_nor_written_through(capsys, models):
    # `--report /dev/stdout --overwrite` must not swap a system link for a file: any link is refused.
    target = models.dir / "elsewhere.json"
    target.write_text("kept")
    link = models.dir / "report.json"
    os.symlink(target, link)
    code, _, err = cli(capsys, "rebasin", models.a, models.b, "-o", models.dir / "out.safetensors",
                       "--report", link, "--overwrite", "-q")
    assert code == 2
    assert f"report.json: is a symbolic link (to {target}): refusing to replace it" in one_line_error(err)
    assert link.is_symlink() and target.read_text() == "kept"
    models.check("elsewhere.json", "report.json")


def test_an_os_error_from_anywhere_is_the_librarys_one_line_and_a_bug_still_shows_its_traceback(capsys, models,
                                                                                                monkeypatch):
    from lib_rebasin import jobs
    from lib_rebasin.errors import user_message
    failing = models.dir / "gone.safetensors"
    for error, says in ((OSError(errno.EIO, os.strerror(errno.EIO), str(failing)), "input/output error"),
                        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(failing)), "the disk is full"),
                        (MemoryError(), "out of memory: close other programs")):
        monkeypatch.setattr(jobs, "run", lambda request, monitor, error=error: (_ for _ in ()).throw(error))
        code, _, err = cli(capsys, "amp", models.a, models.b, "-o", models.dir / "out.safetensors", "-q")
        assert code == 2
        assert says in one_line_error(err) and "Errno" not in err
        assert one_line_error(err) == f"error: {user_message(error)}"  # what the tab and REST show too
    monkeypatch.setattr(jobs, "run", lambda request, monitor: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["amp", str(models.a), str(models.b), "-o", str(models.dir / "out.safetensors"), "-q"])
    models.check()
