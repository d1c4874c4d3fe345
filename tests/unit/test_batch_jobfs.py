"""The batch service's file work in users' job folders (labfleet_batch.jobfs) and the
command line of a completion (labfleet_batch.local_proc)."""

from __future__ import annotations

import os
import stat

import pytest
from labfleet_batch import jobfs, local_proc


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    return home


def folder(home, name="job-1", chown=None):
    return jobfs.JobFolder.of(home, home / "batch" / name, chown)


def test_prepare_creates_folder_files_script_and_logs(home):
    jobfs.prepare(folder(home), {"in.txt": "data"}, "echo hi")
    job = home / "batch" / "job-1"
    assert (job / "in.txt").read_text() == "data"
    assert (job / jobfs.SCRIPT_NAME).read_text() == "echo hi\n"
    assert stat.S_IMODE((job / jobfs.SCRIPT_NAME).stat().st_mode) == 0o700
    assert (job / "logs").is_dir()


def test_prepare_refuses_a_linked_batch_folder_and_writes_nothing(home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / "batch").symlink_to(elsewhere)
    with pytest.raises(jobfs.JobFolderError, match="symbolic link"):
        jobfs.prepare(folder(home), {"in.txt": "data"}, None)
    assert list(elsewhere.iterdir()) == []


def test_read_refuses_links_fifos_and_hard_links(home, tmp_path):
    jobfs.prepare(folder(home), {}, None)
    logs = home / "batch" / "job-1" / "logs"
    (logs / "0.log").write_text("mine\n")
    assert jobfs.read_text(folder(home), "logs", "0.log") == "mine\n"
    assert jobfs.read_text(folder(home), "logs", "0.log", limit=3) == "ne\n"
    secret = tmp_path / "secret"
    secret.write_text("not yours")
    (logs / "1.log").symlink_to(secret)
    with pytest.raises(jobfs.JobFolderError, match="symbolic link"):
        jobfs.read_text(folder(home), "logs", "1.log")
    os.mkfifo(logs / "2.log")
    with pytest.raises(jobfs.JobFolderError, match="not a plain file"):
        jobfs.read_text(folder(home), "logs", "2.log")  # and it did not block
    os.link(secret, logs / "3.log")
    with pytest.raises(jobfs.JobFolderError, match="not a plain file"):
        jobfs.read_text(folder(home), "logs", "3.log")
    # a folder on the way replaced by a link
    (home / "batch" / "job-2").symlink_to(home / "batch" / "job-1")
    with pytest.raises(jobfs.JobFolderError, match="symbolic link"):
        jobfs.read_text(folder(home, "job-2"), "logs", "0.log")
    assert jobfs.mtime(folder(home, "job-2"), "logs", "0.log") is None
    with pytest.raises(FileNotFoundError):
        jobfs.read_text(folder(home), "logs", "9.log")


def test_read_refuses_a_file_of_someone_else(home):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another uid")
    jobfs.prepare(folder(home), {}, None)
    log = home / "batch" / "job-1" / "logs" / "0.log"
    log.write_text("planted")
    os.chown(log, 299990, 299990)
    with pytest.raises(jobfs.JobFolderError, match="belongs to uid 299990"):
        jobfs.read_text(folder(home), "logs", "0.log")


def test_folder_must_be_inside_the_home(home):
    with pytest.raises(jobfs.JobFolderError):
        jobfs.JobFolder.of(home, home.parent / "bob" / "batch" / "x")


def test_completion_runs_as_the_user_in_its_own_pid_namespace():
    argv = local_proc.completion_argv(
        "/srv/home/alice/batch/j", 2, ["python", "x.py"], (200005, 200005, [300002]),
        ("/usr/bin/unshare", "/usr/bin/setpriv"),
    )  # fmt: skip
    assert argv[:5] == ["/usr/bin/unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    assert argv[5:10] == [
        "/usr/bin/setpriv", "--reuid=200005", "--regid=200005", "--groups=300002", "--",
    ]  # fmt: skip
    assert argv[10:13] == ["/bin/sh", "-c", local_proc.EXIT_WRAPPER]
    assert argv[13:] == ["labfleet-job", "/srv/home/alice/batch/j", "2", "python", "x.py"]
    # the wrapper broadcasts SIGTERM only as the init of a namespace of its own
    assert '[ "$$" = 1 ]' in local_proc.EXIT_WRAPPER
    plain = local_proc.completion_argv("/w", 0, ["true"])
    assert plain[0] == "/bin/sh" and "unshare" not in " ".join(plain)
