"""Download client: retries, resume, Drive confirmation, checks, offline, mirror, locking.

Every test serves small files it creates from pytest-httpserver on loopback and uses a test
registry with a fake model; the cache is ``tmp_path`` (UNISEG_HOME).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from unisegcli.errors import ChecksumError, DownloadError, OfflineError
from unisegcli.weights import cache
from unisegcli.weights.cards import parse_registry
from unisegcli.weights.download import (
    RetryPolicy, UnverifiedFileWarning, drive_confirm_url, ensure_model, file_urls,
)

pytestmark = pytest.mark.timeout(60)

TASK = {
    "name": "liver", "index": 0, "modality": "CT", "channels": ["ct"], "labels": {"1": "liver"},
    "spacing_mm": [3.0, 1.5, 1.5], "normalization": {"ct": {"scheme": "zscore"}},
}
CKPT = bytes(range(256)) * 1200  # 307,200 bytes: several 64 KiB chunks
PLANS = b"\x80\x04plans" * 10


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(server: HTTPServer, path: str, data: bytes) -> None:
    server.expect_request(path).respond_with_data(data, content_type="application/octet-stream")


def make_card(files: list[dict]):
    """A model card 'fake' 0.1 with the given file entries."""
    data = {
        "schema_version": 1,
        "task_sets": {"t": [TASK]},
        "models": {"fake": {
            "family": "uniseg", "version": "0.1", "description": "test model",
            "license": "Test license XYZ", "task_set": "t", "files": files,
        }},
    }
    return parse_registry(data)["fake"]


def file_entry(server: HTTPServer, name: str, role: str, data: bytes, *, with_sha: bool = True) -> dict:
    return {"name": name, "role": role, "urls": [server.url_for(f"/files/{name}")],
            "sha256": sha(data) if with_sha else None, "size_bytes": None}


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    for var in ("UNISEG_OFFLINE", "UNISEG_MIRROR", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def fast(sleeps: list[float] | None = None, attempts: int = 4) -> RetryPolicy:
    """A policy with tiny timeouts whose sleeps are recorded instead of slept."""
    record = sleeps if sleeps is not None else []
    return RetryPolicy(attempts=attempts, backoff_s=0.01, connect_timeout_s=2, read_timeout_s=5,
                       sleep=record.append)


def serve_bytes(data: bytes, log: list[dict]):
    """A handler honouring Range requests that records the Range header and bytes sent."""
    def handler(request: Request) -> Response:
        header = request.headers.get("Range")
        if header:
            start = int(header.split("=")[1].split("-")[0])
            body = data[start:]
            log.append({"range": header, "sent": len(body)})
            return Response(body, status=206, content_type="application/octet-stream",
                            headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        log.append({"range": None, "sent": len(data)})
        return Response(data, content_type="application/octet-stream")
    return handler


def test_normal_download_records_manifest_and_reuses_cache(httpserver: HTTPServer) -> None:
    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT),
                      file_entry(httpserver, "plans.pkl", "plans", PLANS)])
    serve(httpserver, "/files/model.bin", CKPT)
    serve(httpserver, "/files/plans.pkl", PLANS)

    files = ensure_model(card, policy=fast())

    assert files["checkpoint"].read_bytes() == CKPT and files["plans"].read_bytes() == PLANS
    assert files["checkpoint"].parent == cache.cache_root() / "models" / "fake" / "0.1"
    manifest = json.loads((files["checkpoint"].parent / "manifest.json").read_text())
    record = manifest["files"]["model.bin"]
    assert record["sha256"] == sha(CKPT) and record["size_bytes"] == len(CKPT)
    assert record["source"].endswith("/files/model.bin") and record["time"]
    assert not list(files["checkpoint"].parent.glob("*.part"))
    requests_before = len(httpserver.log)
    assert ensure_model(card, policy=fast()) == files
    assert len(httpserver.log) == requests_before  # cached: no new request


def test_two_503_then_200_retries_and_honours_retry_after(httpserver: HTTPServer) -> None:
    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT)])
    calls: list[int] = []

    def handler(request: Request) -> Response:
        calls.append(1)
        if len(calls) == 1:
            return Response("busy", status=503, headers={"Retry-After": "7"})
        if len(calls) == 2:
            return Response("busy", status=503)
        return Response(CKPT, content_type="application/octet-stream")

    httpserver.expect_request("/files/model.bin").respond_with_handler(handler)
    sleeps: list[float] = []
    files = ensure_model(card, policy=fast(sleeps))
    assert files["checkpoint"].read_bytes() == CKPT
    assert len(calls) == 3
    assert sleeps == [7.0, 0.02]  # Retry-After seconds, then exponential backoff (2nd attempt)


def test_connection_dropped_mid_body_resumes_with_range(httpserver: HTTPServer) -> None:
    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT)])
    log: list[dict] = []
    cut = 200_000
    ranged = serve_bytes(CKPT, log)

    def handler(request: Request) -> Response:
        if not log:  # first request: promise the whole file, send part of it, hang up
            log.append({"range": request.headers.get("Range"), "sent": cut})
            return Response(iter([CKPT[:cut]]), content_type="application/octet-stream",
                            headers={"Content-Length": str(len(CKPT))})
        return ranged(request)

    httpserver.expect_request("/files/model.bin").respond_with_handler(handler)
    files = ensure_model(card, policy=fast())

    assert files["checkpoint"].read_bytes() == CKPT
    assert len(log) == 2 and log[0]["range"] is None
    start = int(log[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut  # resumed from what arrived (minus at most one chunk in flight)
    assert log[1]["sent"] == len(CKPT) - start  # only the remainder was sent again


def test_server_ignoring_range_restarts_from_zero(httpserver: HTTPServer) -> None:
    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT)])
    directory = cache.model_dir(card)
    directory.mkdir(parents=True)
    (directory / "model.bin.part").write_bytes(CKPT[:100_000])  # an earlier, interrupted try
    seen_range: list[str | None] = []

    def handler(request: Request) -> Response:
        seen_range.append(request.headers.get("Range"))
        return Response(CKPT, status=200, content_type="application/octet-stream")  # ignores Range

    httpserver.expect_request("/files/model.bin").respond_with_handler(handler)
    files = ensure_model(card, policy=fast())
    assert seen_range == ["bytes=100000-"]
    assert files["checkpoint"].read_bytes() == CKPT  # not the prefix + whole file
    assert not (directory / "model.bin.part").exists()


def test_complete_part_from_an_earlier_run_is_checked_not_fetched(httpserver: HTTPServer) -> None:
    entry = file_entry(httpserver, "model.bin", "checkpoint", CKPT)
    entry["size_bytes"] = len(CKPT)
    card = make_card([entry])
    directory = cache.model_dir(card)
    directory.mkdir(parents=True)
    (directory / "model.bin.part").write_bytes(CKPT)  # the earlier run died before its rename
    files = ensure_model(card, policy=fast())
    assert files["checkpoint"].read_bytes() == CKPT and httpserver.log == []


def test_wrong_sha256_raises_and_leaves_nothing(httpserver: HTTPServer) -> None:
    entry = file_entry(httpserver, "model.bin", "checkpoint", CKPT)
    entry["sha256"] = sha(b"another file")
    card = make_card([entry])
    serve(httpserver, "/files/model.bin", CKPT)
    with pytest.raises(ChecksumError, match="sha256"):
        ensure_model(card, policy=fast())
    directory = cache.model_dir(card)
    assert not (directory / "model.bin").exists()
    assert not (directory / "model.bin.part").exists()
    assert "model.bin" not in cache.read_manifest(card)


@pytest.mark.parametrize("content_type, body", [
    ("text/html; charset=utf-8", b"<html><body>Quota exceeded</body></html>"),
    ("application/octet-stream", b"\n  <!DOCTYPE html><html>Sign in</html>"),
])
def test_html_instead_of_binary_is_refused(httpserver: HTTPServer, content_type: str,
                                          body: bytes) -> None:
    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT, with_sha=False)])
    httpserver.expect_request("/files/model.bin").respond_with_data(body, content_type=content_type)
    with pytest.raises(DownloadError, match="HTML") as info:
        ensure_model(card, policy=fast())
    assert "uniseg weights import fake" in str(info.value)
    directory = cache.model_dir(card)
    assert not (directory / "model.bin").exists() and not (directory / "model.bin.part").exists()


def test_google_drive_confirmation_page_is_followed(httpserver: HTTPServer) -> None:
    card = make_card([{"name": "model.bin", "role": "checkpoint", "sha256": sha(CKPT),
                       "size_bytes": len(CKPT),
                       "urls": [httpserver.url_for("/uc") + "?export=download&id=ABC"]}])
    page = f"""<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>
    <body><p>Google Drive can't scan this file for viruses.</p>
    <form id="download-form" action="{httpserver.url_for('/download')}" method="get">
      <input type="submit" id="uc-download-link" value="Download anyway"/>
      <input type="hidden" name="id" value="ABC">
      <input type="hidden" name="export" value="download">
      <input type="hidden" name="confirm" value="t">
      <input type="hidden" name="uuid" value="1234-uuid">
    </form></body></html>"""
    httpserver.expect_request("/uc", query_string={"export": "download", "id": "ABC"}).respond_with_data(
        page, content_type="text/html; charset=utf-8")
    httpserver.expect_request("/download", query_string={"id": "ABC", "export": "download",
                                                         "confirm": "t", "uuid": "1234-uuid"}
                              ).respond_with_data(CKPT, content_type="application/octet-stream")
    files = ensure_model(card, policy=fast())
    assert files["checkpoint"].read_bytes() == CKPT
    assert [r.path for r, _ in httpserver.log] == ["/uc", "/download"]


def test_drive_confirm_older_link_and_cookie_forms() -> None:
    link_page = ('<a id="uc-download-link" '
                 'href="/uc?export=download&amp;confirm=Xy_9&amp;id=ABC">Download</a>')
    url = drive_confirm_url(link_page, "https://drive.google.com/uc?export=download&id=ABC")
    assert url == "https://drive.google.com/uc?export=download&confirm=Xy_9&id=ABC"
    cookie_url = drive_confirm_url("<html>no link</html>", "https://h/uc?id=A",
                                   {"download_warning_123": "tok"})
    assert cookie_url == "https://h/uc?id=A&confirm=tok"
    assert drive_confirm_url("<html><a href='/help'>help</a></html>", "https://h/uc?id=A") is None


def test_registry_without_sha256_warns_records_and_verify_detects_corruption(
        httpserver: HTTPServer) -> None:
    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT, with_sha=False)])
    serve(httpserver, "/files/model.bin", CKPT)
    with pytest.warns(UnverifiedFileWarning, match="no sha256") as record:
        files = ensure_model(card, policy=fast())
    assert len(record) == 1
    assert cache.read_manifest(card)["model.bin"]["sha256"] == sha(CKPT)
    assert [c.status for c in cache.verify_model(card)] == ["ok"]

    path = files["checkpoint"]
    corrupted = bytearray(path.read_bytes())
    corrupted[1000] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(corrupted))
    (check,) = cache.verify_model(card)
    assert check.status == "mismatch" and check.reference == "manifest"
    assert check.expected_sha256 == sha(CKPT)


def test_the_library_reports_download_progress_by_callback_and_never_prints(httpserver: HTTPServer,
                                                                             capsys) -> None:
    from rich.console import Console

    from unisegcli.cli.console import DownloadBar

    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT)])
    serve(httpserver, "/files/model.bin", CKPT)
    seen: list[tuple[str, int, int | None]] = []
    ensure_model(card, policy=fast(), progress=lambda *args: seen.append(args))
    assert capsys.readouterr() == ("", "")
    assert seen and seen[-1] == ("model.bin", len(CKPT), len(CKPT))
    assert [done for _, done, _ in seen] == sorted(done for _, done, _ in seen)
    cache.remove_model(card)
    stream = io.StringIO()
    with DownloadBar(Console(file=stream, width=120)) as bar:  # the CLI's bar
        ensure_model(card, policy=fast(), progress=bar)
    assert "model.bin" in stream.getvalue() and "307.2 kB" in stream.getvalue()


def test_http_404_fails_fast_with_fix(httpserver: HTTPServer) -> None:
    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT)])
    httpserver.expect_request("/files/model.bin").respond_with_data("nope", status=404)
    sleeps: list[float] = []
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        ensure_model(card, policy=fast(sleeps))
    assert sleeps == [] and len(httpserver.log) == 1
    assert "uniseg weights import fake PATH" in str(info.value)


def test_retries_exhausted_keeps_part_for_resume(httpserver: HTTPServer) -> None:
    card = make_card([file_entry(httpserver, "model.bin", "checkpoint", CKPT)])
    httpserver.expect_request("/files/model.bin").respond_with_data("down", status=502)
    sleeps: list[float] = []
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        ensure_model(card, policy=fast(sleeps, attempts=3))
    assert sleeps == [0.01, 0.02]


def test_not_enough_disk_space_is_refused_before_downloading(httpserver: HTTPServer,
                                                            monkeypatch) -> None:
    entry = file_entry(httpserver, "model.bin", "checkpoint", CKPT)
    entry["size_bytes"] = len(CKPT)
    card = make_card([entry])
    monkeypatch.setattr(cache, "free_bytes", lambda path: 1000)
    with pytest.raises(DownloadError, match="disk space"):
        ensure_model(card, policy=fast())
    assert httpserver.log == []


def test_mirror_env_redirects_every_url(httpserver: HTTPServer, monkeypatch) -> None:
    card = make_card([{"name": "model.bin", "role": "checkpoint", "sha256": sha(CKPT),
                       "size_bytes": None, "urls": ["http://registry.invalid/never"]}])
    monkeypatch.setenv("UNISEG_MIRROR", httpserver.url_for("/mirror/"))
    assert file_urls(card, card.files[0]) == [httpserver.url_for("/mirror/fake/0.1/model.bin")]
    httpserver.expect_request("/mirror/fake/0.1/model.bin").respond_with_data(
        CKPT, content_type="application/octet-stream")
    files = ensure_model(card, policy=fast())
    assert files["checkpoint"].read_bytes() == CKPT
    assert cache.read_manifest(card)["model.bin"]["source"].endswith("/mirror/fake/0.1/model.bin")


@pytest.mark.parametrize("how", ["argument", "env"])
def test_offline_opens_no_socket_and_names_file_and_fix(how: str, monkeypatch) -> None:
    card = make_card([{"name": "model.bin", "role": "checkpoint", "sha256": None, "size_bytes": None,
                       "urls": ["http://127.0.0.1:9/model.bin"]}])
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("offline mode opened a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    if how == "env":
        monkeypatch.setenv("UNISEG_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        ensure_model(card, offline=(how == "argument"))
    message = str(info.value)
    assert "model.bin" in message and str(cache.model_dir(card)) in message
    assert "uniseg weights import fake PATH" in message
    assert attempts == []


def _download_worker(home: str, registry: str, barrier, results) -> None:
    """Runs in a child process: one task of a 'Slurm array' asking for the model."""
    os.environ["UNISEG_HOME"] = home
    card = parse_registry(json.loads(registry))["fake"]
    barrier.wait()
    try:
        files = ensure_model(card, policy=RetryPolicy(attempts=2, backoff_s=0.01))
        results.put(("ok", files["checkpoint"].read_bytes() == CKPT))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put(("error", repr(exc)))


def test_eight_processes_download_once_and_share(httpserver: HTTPServer, tmp_path: Path,
                                                 monkeypatch) -> None:
    served: list[int] = []

    def slow(request: Request) -> Response:
        served.append(1)

        def body():
            for i in range(0, len(CKPT), 65536):  # slow enough that the others arrive meanwhile
                time.sleep(0.05)
                yield CKPT[i:i + 65536]
        return Response(body(), content_type="application/octet-stream",
                        headers={"Content-Length": str(len(CKPT))})

    httpserver.expect_request("/files/model.bin").respond_with_handler(slow)
    registry = {"schema_version": 1, "task_sets": {"t": [TASK]}, "models": {"fake": {
        "family": "uniseg", "version": "0.1", "description": "d", "license": "L", "task_set": "t",
        "files": [file_entry(httpserver, "model.bin", "checkpoint", CKPT, with_sha=False)]}}}
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    home = str(tmp_path / "shared-cache")
    procs = [ctx.Process(target=_download_worker, args=(home, json.dumps(registry), barrier, results))
             for _ in range(8)]
    for p in procs:
        p.start()
    # Generous: 8 spawned interpreters import torch at once on a 2-core runner.
    outcomes = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=120)
    assert outcomes == [("ok", True)] * 8
    assert len(served) == 1  # exactly one full transfer
    card = make_card(registry["models"]["fake"]["files"])
    monkeypatch.setenv("UNISEG_HOME", home)
    assert [c.status for c in cache.verify_model(card)] == ["ok"]


@pytest.mark.parametrize("head, page", [
    (b"<!DOCTYPE html><html>Sign in</html>", True),
    (b"\n  <html lang='en'><head>", True),
    (b"\xef\xbb\xbf<!-- error --><html>", True),
    (b"<s>\n<pad>\n</s>\n<unk>\n[CLS]", False),  # a tokenizer vocabulary, not a web page
    (b"<?xml version='1.0'?><config/>", False),
    (b"PK\x03\x04<html", False),
])
def test_only_html_documents_count_as_web_pages(head: bytes, page: bool) -> None:
    from unisegcli.weights.safe_pickle import looks_like_html

    assert looks_like_html(head) is page
