"""Every failure of every command is one line on stderr and exit 2; Ctrl-C is 130."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nasar_zarr import store
from nasar_zarr.testing import write_corpus
from tests.conftest import assert_store_equals_source, cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(
        tmp_path_factory.mktemp("cli-corpus"), n_shards=2, samples_per_shard=[5, 6], seed=13
    )


@pytest.fixture(scope="module")
def not_a_cube(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    (path / "notes.txt").write_text("not a cube")
    return path


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    prefix = f"nasar-zarr {command}: error: "
    assert result.stderr.startswith(prefix), result.stderr
    return result.stderr[len(prefix) :].rstrip("\n")


def test_no_such_path(corpus, tmp_path):
    missing = tmp_path / "nope"
    result = cli("convert", str(missing), str(tmp_path / "c.zarr"))
    assert one_line_error(result, "convert") == f"{missing}: no such file or directory"
    assert result.stdout == ""  # refused before any plan is printed
    for command in ("info", "verify"):
        assert one_line_error(cli(command, str(missing)), command) == (
            f"{missing}: no such file or directory"
        )


@pytest.mark.parametrize("command", ["info", "verify", "append", "catalog"])
def test_a_directory_that_is_not_a_cube(command, corpus, not_a_cube, tmp_path):
    args = {
        "info": ["info", str(not_a_cube)],
        "verify": ["verify", str(corpus.root), str(not_a_cube)],
        "append": ["append", str(corpus.root), str(not_a_cube)],
        "catalog": ["catalog", str(not_a_cube), "-o", str(tmp_path / "c.yaml")],
    }[command]
    assert one_line_error(cli(*args), command) == (
        f"{not_a_cube}: not a nasar-zarr cube (no Zarr v3 group with 'nasar_zarr' provenance);"
        " make one with `nasar-zarr convert SRC DEST`"
    )


def test_convert_refuses_foreign_content_before_printing_the_plan(corpus, not_a_cube):
    result = cli("convert", str(corpus.root), str(not_a_cube), "--workers", "0")
    assert one_line_error(result, "convert") == (
        f"{not_a_cube} exists and is not a nasar-zarr cube; refusing to write into it"
        " (choose an empty or new destination)"
    )
    assert result.stdout == ""
    assert sorted(p.name for p in not_a_cube.iterdir()) == ["notes.txt"]


def test_permission_denied(corpus):
    # Tests run as root, so a read-only filesystem stands in for a directory we may not write.
    result = cli("convert", str(corpus.root), "/sys/nasar.zarr", "--workers", "0")
    assert one_line_error(result, "convert") == (
        "permission denied: /sys/nasar.zarr: cannot write in /sys (Operation not permitted)"
    )
    assert result.stdout == ""


def test_bad_options_are_refused_before_any_io(tmp_path):
    missing = str(tmp_path / "nope")
    assert one_line_error(cli("convert", missing, "d", "--codec", "lzma"), "convert") == (
        "argument --codec: invalid choice: 'lzma' (choose from 'blosc-lz4', 'blosc-zstd',"
        " 'zstd', 'none')"
    )
    assert (
        one_line_error(
            cli("convert", missing, "d", "--shard", "10", "--inner-chunk", "4"), "convert"
        )
        == "shard (10) must be a multiple of inner_chunk (4)"
    )
    assert one_line_error(cli("info", "d", "--storage-options", "{bad"), "info").startswith(
        "argument --storage-options: not valid JSON"
    )


def test_debug_shows_the_traceback_with_the_same_exit_code(tmp_path):
    result = cli("info", str(tmp_path / "nope"), "--debug")
    assert result.returncode == 2  # as without --debug
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith(
        f"nasar-zarr info: error: {tmp_path / 'nope'}: no such file or directory"
    )


def test_s3_url_without_the_s3_extra(tmp_path):
    # s3fs is installed here; a process where importing it fails is what a user without
    # the extra has.
    code = (
        "import sys; sys.modules['s3fs'] = None; from nasar_zarr.cli import main;"
        f" sys.exit(main(['convert', 's3://bucket/release', '{tmp_path / 'c.zarr'}']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert one_line_error(result, "convert") == (
        "s3:// URLs need s3fs, which is not installed: pip install 'nasar-zarr[s3]'"
    )


def test_missing_credentials(s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
    )
    options = f'{{"endpoint_url": "{s3_server["endpoint_url"]}"}}'
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nasar_zarr",
            "convert",
            "s3://no-creds/release",
            str(tmp_path / "c.zarr"),
            "--storage-options",
            options,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one_line_error(result, "convert") == (
        "Unable to locate credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a"
        " profile), or pass --storage-options '{\"anon\": true}' for a public bucket"
    )


def test_ctrl_c_exits_130_releases_the_lock_and_a_rerun_resumes(corpus, tmp_path):
    dest = tmp_path / "cube.zarr"
    args = ["convert", str(corpus.root), str(dest), "--shard", "4", "--workers", "0"]
    interrupted = cli(*args, fault="after-record:1", signal="INT")
    assert interrupted.returncode == 130
    assert interrupted.stderr.splitlines()[-1] == (
        "nasar-zarr convert: interrupted; the store's lock is released, run the same command"
        " again to resume"
    )
    assert not (dest / store.LOCK_FILE).exists()
    assert sorted(p.name for p in (dest / store.TASKS_DIR).iterdir()) == ["000000.json"]
    first = (dest / store.task_record_path(0)).read_bytes()
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert (dest / store.task_record_path(0)).read_bytes() == first  # not redone
    assert_store_equals_source(dest, corpus.root)


def test_storage_options_must_be_an_object():
    result = cli("info", "x", "--storage-options", "[1, 2]")
    assert one_line_error(result, "info") == (
        "argument --storage-options: must be a JSON object, e.g. '{\"anon\": true}'"
    )


# ---------------------------------------------------------------------------- cubes and S3


def test_a_corpus_is_not_a_cube_from_the_api_and_the_cli(corpus):
    """open_cube, CubeReader, the datasets and the CLI say the same one line."""
    import nasar_zarr as nz
    from nasar_zarr.errors import NotACubeError
    from nasar_zarr.reader import CubeReader

    root = corpus.root
    expected = (
        f"{root}: not a nasar-zarr cube but a corpus to convert (tar shards and"
        f" metadata.parquet); make a cube of it with `nasar-zarr convert {root} DEST`"
    )
    openers = [nz.open_cube, CubeReader, store.open_group]
    try:
        from nasar_zarr.torch import InSARDataset, RTCDataset
    except ImportError:  # torch not installed: the other openers still
        pass
    else:
        openers += [RTCDataset, InSARDataset]
    for opener in openers:
        with pytest.raises(NotACubeError) as caught:
            opener(str(root))
        assert str(caught.value) == expected
        assert isinstance(caught.value, FileNotFoundError)
    assert one_line_error(cli("info", str(root)), "info") == expected
    assert one_line_error(cli("verify", str(root)), "verify") == expected


def test_open_cube_on_a_plain_directory_and_a_missing_path(not_a_cube, tmp_path):
    import nasar_zarr as nz
    from nasar_zarr.errors import NotACubeError

    with pytest.raises(NotACubeError) as caught:
        nz.open_cube(str(not_a_cube))
    assert str(caught.value) == (
        f"{not_a_cube}: not a nasar-zarr cube (no Zarr v3 group with 'nasar_zarr' provenance);"
        " make one with `nasar-zarr convert SRC DEST`"
    )
    with pytest.raises(NotACubeError, match=f"^{tmp_path / 'nope'}: no such file or directory$"):
        nz.open_cube(str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def s3_corpus(s3_server, corpus):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("errs")
    fs.put(str(corpus.root) + "/", "errs/corpus/", recursive=True)
    return "s3://errs/corpus"


def _both(src: str, dest: str, options: dict) -> tuple[Exception, str]:
    """The error of plan + execute from the API, and the CLI's one line."""
    import json

    import nasar_zarr as nz

    with pytest.raises(Exception) as caught:
        nz.plan_conversion(src, dest, storage_options=options).execute(workers=0)
    result = cli("convert", src, dest, "--workers", "0", "--storage-options", json.dumps(options))
    return caught.value, one_line_error(result, "convert")


def test_s3_endpoint_that_is_not_s3(s3_corpus, s3_server):
    from nasar_zarr.errors import EndpointError
    from nasar_zarr.testing.http import RangeServer

    with RangeServer(Path(__file__).parent) as web:
        error, line = _both(s3_corpus, "s3://errs/c.zarr", {**s3_server, "endpoint_url": web.url})
    assert isinstance(error, EndpointError) and isinstance(error, ConnectionError)
    assert (
        str(error)
        == line
        == (
            f"{s3_corpus}: {web.url} does not answer as an S3 endpoint (listing buckets:"
            " FileNotFoundError: Not Found); check endpoint_url in the storage options"
            " (--storage-options)"
        )
    )


def test_s3_unknown_storage_option(s3_corpus, s3_server):
    from nasar_zarr.errors import StorageOptionsError

    error, line = _both(s3_corpus, "s3://errs/c.zarr", {**s3_server, "endpont_url": "x"})
    assert isinstance(error, StorageOptionsError) and isinstance(error, TypeError)
    assert str(error) == line
    assert line.startswith(
        f"{s3_corpus}: unknown storage option 'endpont_url' for s3:// URLs (s3fs takes anon,"
    )


def test_s3_missing_destination_bucket(s3_corpus, s3_server):
    from nasar_zarr.errors import NoSuchBucketError

    error, line = _both(s3_corpus, "s3://no-such-bucket/c.zarr", s3_server)
    assert isinstance(error, NoSuchBucketError) and isinstance(error, FileNotFoundError)
    assert (
        str(error)
        == line
        == (
            f"s3://no-such-bucket/c.zarr: no bucket 'no-such-bucket' at"
            f" {s3_server['endpoint_url']}; create it first (or fix the URL)"
        )
    )


def test_s3_dead_endpoint_fails_within_seconds(s3_corpus, s3_server):
    import socket
    import time

    import nasar_zarr as nz
    from nasar_zarr.errors import EndpointError

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = {**s3_server, "endpoint_url": f"http://127.0.0.1:{port}"}
    start = time.perf_counter()
    with pytest.raises(EndpointError) as caught:
        nz.plan_conversion(s3_corpus, "s3://errs/c.zarr", storage_options=dead)
    assert time.perf_counter() - start < 5
    assert str(caught.value) == (
        f"{s3_corpus}: cannot connect to http://127.0.0.1:{port} (Could not connect to the"
        f' endpoint URL: "http://127.0.0.1:{port}/errs/corpus/metadata.parquet"); check'
        " endpoint_url in the storage options (--storage-options)"
    )
    # the storage options override the bound, key by key
    assert store.storage_options(
        "s3://b/k", {"config_kwargs": {"connect_timeout": 60, "read_timeout": 5}}
    )["config_kwargs"] == {
        "connect_timeout": 60,
        "read_timeout": 5,
        "retries": {"max_attempts": 2, "mode": "standard"},
    }
    assert store.storage_options("memory://x", {"anything": 1}) == {"anything": 1}
