"""Download a model's files into the cache: retries, resume, Drive confirmation, checks, locking.

``ensure_model(card)`` returns the cached files of a model, downloading the missing ones first.
Many processes (a Slurm array) may call it at once on one cache: they take the model's file
lock in turn, the first downloads, the others wait, re-check and reuse its files. A download
is written to ``<final>.part`` (kept for resuming with an HTTP Range request), hashed, and
only then renamed atomically to its final name, so no partial file is ever visible there.

Environment:
    UNISEG_HOME     cache root (see `unisegcli.weights.cache`).
    UNISEG_OFFLINE  "1"/"true"/"yes": never open a socket; a missing file raises OfflineError.
    UNISEG_MIRROR   base URL of a mirror; every file then comes from
                    ``<base>/<model name>/<model version>/<file name>`` (for example
                    ``https://mirror.example.org/uniseg/uniseg/1.0/plans.pkl``) instead of
                    the registry URLs. A mirror is a plain static file server holding
                    copies of the cache folders ``models/<name>/<version>/``.
"""

from __future__ import annotations

import itertools
import os
import time
import warnings
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection
from urllib.parse import parse_qs, quote, urlencode, urljoin, urlparse

from unisegcli.errors import ChecksumError, DownloadError
from unisegcli.weights import cache
from unisegcli.weights.cards import FileCard, ModelCard
from unisegcli.io.hashing import sha256_file

if TYPE_CHECKING:
    import requests

CHUNK_BYTES = 64 << 10  # small: bytes of a chunk in flight are lost when a connection breaks
HTML_LIMIT_BYTES = 2 << 20  # read at most this much of a page that may carry a confirm token
FREE_MARGIN_BYTES = 16 << 20  # keep some room so the disk is not filled to the last byte
MAX_CONFIRM_HOPS = 3
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class UnverifiedFileWarning(UserWarning):
    """A file was downloaded although the registry has no sha256 to check it against."""


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts and retries of a download. Tests pass tiny delays and a recording ``sleep``.

    A failed attempt (connection error, read timeout, HTTP 429/5xx) waits
    ``min(backoff_s * 2**(n-1), max_backoff_s)`` before attempt n+1, or the server's
    ``Retry-After`` (seconds form) capped at ``max_retry_after_s``.
    """

    attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_retry_after_s: float = 300.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def delay_s(self, attempt: int, retry_after: str | None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after.strip()), self.max_retry_after_s)
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


@dataclass(frozen=True)
class DownloadResult:
    """A downloaded file, checked and still at ``path`` (the ``.part`` file) until committed."""

    path: Path
    url: str
    sha256: str
    size_bytes: int


class _Retry(Exception):
    """An attempt failed in a way worth retrying (the .part file keeps what arrived)."""

    def __init__(self, reason: str, retry_after: str | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def offline_from_env() -> bool:
    return os.environ.get("UNISEG_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def file_urls(card: ModelCard, file: FileCard) -> list[str]:
    """URLs to try for a file: the mirror's (UNISEG_MIRROR) or else the registry's, in order."""
    mirror = os.environ.get("UNISEG_MIRROR", "").strip()
    if mirror:
        parts = (card.name, card.version, file.name)
        return [mirror.rstrip("/") + "/" + "/".join(quote(p) for p in parts)]
    return list(file.urls)


class _ConfirmParser(HTMLParser):
    """Collects forms (action + hidden inputs) and links of a Drive warning page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])


def drive_confirm_url(page: str, base_url: str, cookies: dict[str, str] | None = None) -> str | None:
    """The URL behind Google Drive's "can't scan for viruses" page, or None if it has none.

    Handles the current form (action drive.usercontent.google.com/download, hidden inputs
    id/export/confirm/uuid), the older ``confirm=XXXX`` link, and a ``download_warning``
    cookie. Only pages carrying a confirm token are followed.
    """
    parser = _ConfirmParser()
    parser.feed(page)
    for action, inputs in parser.forms:
        if inputs.get("confirm"):
            return urljoin(base_url, action or base_url).split("?")[0] + "?" + urlencode(inputs)
    for href in parser.links:
        link = urljoin(base_url, unescape(href))
        if parse_qs(urlparse(link).query).get("confirm"):
            return link
    token = next((v for k, v in (cookies or {}).items() if k.startswith("download_warning")), None)
    if token:
        return base_url + ("&" if "?" in base_url else "?") + urlencode({"confirm": token})
    return None


DownloadProgress = Callable[[str, int, "int | None"], None]  # (file name, bytes so far, total or None)


def _attempt(session: requests.Session, url: str, part: Path, policy: RetryPolicy,
             report: Callable[[int, "int | None"], None], hops: list[str]) -> str | None:
    """One HTTP request, appending to ``part``. Return a confirm URL to follow, or None when done.

    Raises _Retry for transient failures and DownloadError for permanent ones.
    """
    import requests

    offset = part.stat().st_size if part.exists() else 0
    # identity encoding: byte offsets of a Range request must be offsets of the file itself
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = session.get(url, headers=headers, stream=True,
                           timeout=(policy.connect_timeout_s, policy.read_timeout_s))
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Retry(f"cannot connect to {url}: {exc}") from exc
    with resp:
        if resp.status_code in RETRY_STATUS:
            raise _Retry(f"{url} answered HTTP {resp.status_code}", resp.headers.get("Retry-After"))
        if resp.status_code == 416:
            if resp.headers.get("Content-Range", "").strip() == f"bytes */{offset}":
                return None  # the .part already holds the whole file
            part.unlink(missing_ok=True)  # our .part does not fit the file any more: start over
            raise _Retry(f"{url} answered 416 to 'Range: bytes={offset}-'")
        if resp.status_code not in (200, 206):
            raise DownloadError(f"{url} answered HTTP {resp.status_code} {resp.reason}, expected 200")
        if resp.status_code == 206:
            start = resp.headers.get("Content-Range", "").replace("bytes ", "").split("-")[0]
            if not offset or start.strip() != str(offset):
                part.unlink(missing_ok=True)  # a range we did not ask for: distrust it
                raise _Retry(f"{url} answered 206 with Content-Range "
                             f"'{resp.headers.get('Content-Range')}' to a request from byte {offset}")
        else:
            offset = 0  # 200: full body (the server ignored Range) -> restart from zero
        chunks = resp.iter_content(CHUNK_BYTES)
        try:
            first = next(chunks, b"")
            content_type = resp.headers.get("Content-Type", "").lower()
            if "html" in content_type or (offset == 0 and cache.looks_like_html(first[:64])):
                body = first
                for chunk in chunks:
                    body += chunk
                    if len(body) > HTML_LIMIT_BYTES:
                        break
                confirm = drive_confirm_url(body.decode("utf-8", "replace"), resp.url,
                                            session.cookies.get_dict())
                if confirm and len(hops) < MAX_CONFIRM_HOPS:
                    hops.append(confirm)
                    return confirm
                raise DownloadError(
                    f"{url} answered an HTML/text page ({content_type or 'no Content-Type'}, "
                    f"starting {body[:60]!r}) where the binary file was expected; refused, "
                    f"nothing saved. Google Drive sends such a page when its download quota is "
                    f"exceeded or the file is not public."
                )
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            if total is not None and total - offset > cache.free_bytes(part.parent) - FREE_MARGIN_BYTES:
                raise DownloadError(
                    f"not enough disk space in {part.parent}: {url} needs {total - offset} bytes, "
                    f"{cache.free_bytes(part.parent)} are free. Free space or set UNISEG_HOME to "
                    f"a larger disk."
                )
            done = offset
            with open(part, "ab" if offset else "wb") as out:
                for piece in itertools.chain([first], chunks):
                    out.write(piece)
                    done += len(piece)
                    report(done, total)
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retry(f"connection to {url} broke: {exc}") from exc
        except OSError as exc:  # after the requests errors, which are OSErrors too
            raise DownloadError(f"cannot write {part}: {exc}. Free disk space or set "
                                f"UNISEG_HOME to a writable disk.") from exc
        if total is not None and done < total:
            raise _Retry(f"{url} sent {done} of {total} bytes")
    return None


def fetch_file(
    urls: list[str], part: Path, *, expected_sha256: str | None = None,
    expected_size_bytes: int | None = None, policy: RetryPolicy | None = None,
    session: requests.Session | None = None, progress: DownloadProgress | None = None,
    label: str = "",
) -> DownloadResult:
    """Download into ``part`` (resuming what is there), then check size and sha256.

    Tries each URL in turn. A checksum failure deletes ``part`` and raises ChecksumError; a
    network failure after all retries keeps it for resuming and raises DownloadError.
    """
    import requests

    policy = policy or RetryPolicy()
    session = session or requests.Session()
    name = label or part.name

    def report(done: int, total: int | None) -> None:
        if progress is not None:
            progress(name, done, total)

    if expected_size_bytes is not None:
        have = part.stat().st_size if part.exists() else 0
        if have > expected_size_bytes:
            part.unlink()
            have = 0
        if expected_size_bytes - have > cache.free_bytes(part.parent) - FREE_MARGIN_BYTES:
            raise DownloadError(
                f"not enough disk space in {part.parent}: '{part.name[:-5]}' needs "
                f"{expected_size_bytes - have} bytes, {cache.free_bytes(part.parent)} are free. "
                f"Free space or set UNISEG_HOME to a larger disk."
            )
    errors: list[str] = []
    for index, url in enumerate(urls):
        hops: list[str] = []
        current, attempt = url, 0
        while True:
            attempt += 1
            if expected_size_bytes is not None and part.exists() \
                    and part.stat().st_size == expected_size_bytes:
                break  # complete from an earlier run that stopped before the check
            try:
                follow = _attempt(session, current, part, policy, report, hops)
                if follow:
                    current, attempt = follow, 0  # a confirmation hop is not a failure
                    continue
                break
            except _Retry as exc:
                if attempt >= policy.attempts:
                    errors.append(f"{exc} (gave up after {attempt} attempts)")
                    current = None
                    break
                policy.sleep(policy.delay_s(attempt, exc.retry_after))
            except DownloadError as exc:
                errors.append(str(exc))
                current = None
                break
        if current is None:
            if index < len(urls) - 1:
                part.unlink(missing_ok=True)  # the next URL may serve other bytes: do not mix
            continue
        size = part.stat().st_size
        if size == 0:
            part.unlink()
            raise DownloadError(f"{current} answered an empty body where '{label}' was expected.")
        sha = sha256_file(part)
        if expected_size_bytes is not None and size != expected_size_bytes:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{current} gave {size} bytes, expected {expected_size_bytes} "
                                f"(registry); the file was deleted, nothing entered the cache.")
        if expected_sha256 and sha != expected_sha256:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{current} gave a file with sha256 {sha}, expected {expected_sha256} (registry); "
                f"it was deleted, nothing entered the cache. The server (or UNISEG_MIRROR) may "
                f"serve another version; check the URL or import a good copy."
            )
        return DownloadResult(path=part, url=current, sha256=sha, size_bytes=size)
    raise DownloadError("; ".join(errors) or f"no URL to download '{label}' from")


def ensure_model(
    card: ModelCard, *, offline: bool = False, progress: DownloadProgress | None = None,
    on_wait: Callable[[str], None] | None = None, policy: RetryPolicy | None = None,
    roles: Collection[str] | None = None,
) -> dict[str, Path]:
    """Return the model's cached files by role, downloading the missing ones first.

    roles: only the files with these roles (e.g. the parts of a multi-part model a run
    needs); all files by default. progress(name, bytes so far, total) reports each download;
    on_wait(message) is told when another process holds the model's lock (the library never
    prints: the CLI draws the bar and the line).

    offline (or UNISEG_OFFLINE=1) never opens a socket: a missing file raises OfflineError.
    When every file is present, nothing is written and no lock is taken (read-only caches
    work). Otherwise the model lock is held while downloading; processes that waited for it
    re-check the cache and reuse what the first one downloaded. Files the registry has no
    sha256 for are downloaded with one UnverifiedFileWarning; the hash seen is recorded in
    the manifest so that `uniseg weights verify` can detect later corruption.
    """
    offline = offline or offline_from_env()
    if not cache.missing_files(card, roles=roles):
        return cache.find_model_files(card, offline=offline, roles=roles)
    if offline or card.packaged:  # nothing to download: raise naming the missing files
        return cache.find_model_files(card, offline=offline, roles=roles)

    import requests

    unverified: list[tuple[FileCard, str]] = []
    with cache.model_lock(card, on_wait=on_wait) as directory:
        missing = cache.missing_files(card, roles=roles)  # another process may have fetched them meanwhile
        known = sum(f.size_bytes or 0 for f in missing)
        if known and known > cache.free_bytes(directory) - FREE_MARGIN_BYTES:
            raise DownloadError(
                f"not enough disk space in {directory}: model '{card.name}' needs {known} bytes, "
                f"{cache.free_bytes(directory)} are free. Free space or set UNISEG_HOME to a "
                f"larger disk."
            )
        session = requests.Session()
        for f in missing:
            part = cache.part_path(directory / f.name)
            try:
                result = fetch_file(
                    file_urls(card, f), part, expected_sha256=f.sha256,
                    expected_size_bytes=f.size_bytes, policy=policy, session=session,
                    progress=progress, label=f.name,
                )
            except DownloadError as exc:
                raise DownloadError(
                    f"cannot download '{f.name}' of model '{card.name}': {exc}. Retry later "
                    f"(a partial download is kept and resumed), set UNISEG_MIRROR, or fetch the "
                    f"file in a browser and run `uniseg weights import {card.name} PATH`."
                ) from exc
            cache.commit_file(card, f, result.path, sha256=result.sha256,
                              size_bytes=result.size_bytes, source=result.url)
            if not f.sha256:
                unverified.append((f, result.sha256))
    if unverified:
        names = ", ".join(f"'{f.name}'" for f, _ in unverified)
        seen = ", ".join(f"{f.name}: {digest}" for f, digest in unverified)
        warnings.warn(UnverifiedFileWarning(
            f"the registry has no sha256 for {names} of model '{card.name}', so the download "
            f"could not be checked against a known hash. The hash seen (sha256 {seen}) was "
            f"recorded in {cache.manifest_path(card)}; `uniseg weights verify {card.name}` "
            f"compares the files with it later."
        ), stacklevel=2)
    return cache.find_model_files(card, roles=roles)


__all__ = [
    "DownloadResult", "RetryPolicy", "UnverifiedFileWarning", "drive_confirm_url",
    "ensure_model", "fetch_file", "file_urls", "offline_from_env",
]
