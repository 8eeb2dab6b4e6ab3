"""Send the model work to OpenAI-compatible servers: vLLM, SGLang, Ollama, ``transformers serve``.

Each ``Request`` becomes one ``POST {base_url}/chat/completions``, with up to
``model.max_concurrency`` of them in flight so a server's continuous batching
stays full.  What goes over the wire:

- the image exactly as ``daemon.images`` sized it (sides multiples of 28), as
  a lossless PNG ``data:`` URL, so the pixels the model sees are the pixels
  the sidecar's ``shown_size`` names and grounding boxes map back exactly;
- hints that stop the server from resizing it again (checked per server, see
  ``docs/scaling.md``): ``mm_processor_kwargs`` with ``min_pixels`` and
  ``max_pixels`` equal to the image's own area (vLLM's Qwen2-VL processor
  then leaves it as it is), and ``chat_template_kwargs.processor_kwargs.
  do_resize = false`` (``transformers serve`` passes it to the processor).
  SGLang and Ollama take neither, but leave an image alone whose sides are
  multiples of 28 and whose area is inside their limits.  ``transformers
  serve`` refuses any field it does not know (HTTP 422), so a server whose
  4xx names one of these extensions is remembered and asked again without
  it;
- the request's ``temperature`` (0, greedy, for folder jobs; a chat of the
  API may ask for more), its conversation turn by turn when it has
  ``messages`` (a chat), and ``max_tokens`` = the request's
  ``max_new_tokens``; an answer is ``finished`` when ``finish_reason`` is
  ``stop``.

Bounds (issue 10.13): ``model.timeout`` bounds each whole exchange, connect
to last byte; every read and write of the connection waits only for the
time left (``_DeadlineBackend``), so a server dripping a byte a second
fails at ``timeout``.  At most ``CHARS_PER_TOKEN`` characters per
``max_new_tokens`` of answer are kept (cut and marked unfinished past
that), and the body is read only that far, so a 200 MB answer costs about
a megabyte.  A reply without answer text (``content: null``) is a
``BackendError``, never an empty sidecar that counts as done.

Servers and faults.  A list of ``base_url``s is used round-robin.  A server
that cannot be reached (connection refused, connect timeout, a probe that
fails) cools down (1 s, doubling to 30 s) and is probed with ``GET
{base_url}/models`` before it gets work again.  429, 5xx, a dropped
connection and a read timeout are retried with exponential backoff and
jitter, on another server when there is one, honouring ``Retry-After``; a
``Retry-After`` longer than a minute cools that server down instead of
holding a thread.  When no server is left to try, or 429/502/503 outlast the
retries, ``generate`` raises ``BackendUnavailableError``: the daemon pauses
its queue instead of spending jobs' attempts, and ``outage()`` says since
when and why.  A 4xx other than
408/429 is the request's own fault and raises ``BackendError`` with the
server's message, without retrying.

The API key is read once from the environment variable NAMED by
``model.api_key_env`` and sent as ``Authorization: Bearer``.  It is never
logged, never put in an error message (a server that echoes it has it
replaced by ``***``) and never written anywhere.

Deliberately not here:

- The official ``openai`` SDK.  It reads ``OPENAI_API_KEY``,
  ``OPENAI_ADMIN_KEY``, ``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID`` and
  ``OPENAI_CUSTOM_HEADERS`` from the environment whenever an argument is left
  out, which would send a user's OpenAI credentials to a self-hosted server;
  its 2.x releases (which ``openai>=2`` admits) log every request body at
  DEBUG, megabytes of base64 per image into journald; and its own retry loop
  sticks to one URL, so it would have to be switched off anyway.  The whole
  exchange is one JSON POST, done here with ``httpx``.
- Streaming: the whole answer is needed before a sidecar can be written, and
  a plain reply carries ``finish_reason`` and ``usage`` in one piece.
- JPEG or any re-encoding that changes pixels, and any resizing.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from daemon.backends import Answer, BaseBackend, Request
from daemon.config import ModelConfig, is_loopback_host
from daemon.errors import BackendError, BackendUnavailableError, ExitCode, VlwatchError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: Tries per request for 429, 5xx and dropped connections (the first included).
ATTEMPTS = 5
#: Read timeouts per request: the same request on the same model tends to take
#: as long again, so a second timeout fails it rather than tying up the server.
TIMEOUT_ATTEMPTS = 2
BACKOFF_BASE = 0.5  # seconds before the first retry; doubles each time
BACKOFF_CAP = 20.0
#: A Retry-After up to this long is waited out; a longer one cools the server down.
MAX_RETRY_AFTER = 60.0
COOLDOWN_BASE = 1.0  # an unreachable server rests this long, doubling per failure...
COOLDOWN_CAP = 30.0  # ...up to this, then is probed again
PROBE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10.0
#: Extensions to the OpenAI schema that some servers refuse outright
#: (``transformers serve`` answers 422 "Unexpected fields"): a server whose 4xx
#: names one is asked again without it, and never sent it again.
OPTIONAL_FIELDS = ("mm_processor_kwargs", "chat_template_kwargs", "ignore_eos")
#: An answer is cut (and marked truncated) past this many characters per
#: ``max_new_tokens``: generous (a token is 3-4 characters of text), yet a
#: server that sends 200 MB cannot fill the daemon's memory (issue 10.13).
CHARS_PER_TOKEN = 16
#: Raw bytes read of a reply, per answer character (JSON escapes such as
#: ``\u00e9`` take six), plus room for the envelope.
BODY_BYTES_PER_CHAR = 8
BODY_SLACK = 1 << 20


@dataclass(frozen=True)
class ServerHealth:
    """What ``vlwatch status`` can show about one server."""

    url: str  # without any user:password part
    up: bool
    since: float | None = None  # wall-clock time it went down (None while up)
    error: str | None = None  # the last error seen from it


@dataclass(frozen=True)
class Outage:
    """No server can be reached: since when (wall clock) and the errors that say why."""

    since: float
    error: str

    def __str__(self) -> str:
        stamp = datetime.fromtimestamp(self.since, timezone.utc).isoformat(timespec="seconds")
        return f"no model server answers (since {stamp}): {self.error}"


class _Retryable(Exception):
    """A failure worth another try: 429, 5xx, a dropped connection, a read timeout."""

    def __init__(self, reason: str, *, retry_after: float | None = None, busy: bool = False,
                 timeout: bool = False, check_alive: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.busy = busy  # 429/502/503: come back later; if it lasts, the queue pauses
        self.timeout = timeout
        # A timeout or a dropped connection: probe before blaming the request,
        # since a server that died mid-answer looks just like that.
        self.check_alive = check_alive


class _Unreachable(Exception):
    """The server cannot be reached at all: take it out of rotation for a while."""


class _Server:
    """One base URL, its connection pool and its health."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.display = _without_userinfo(self.url)
        self.client: httpx.Client | None = None
        self.probe_lock = threading.Lock()
        self.up = True  # optimistic until the first failure
        self.available_at = 0.0  # monotonic; not picked before this
        self.needs_probe = False
        self.down_since: float | None = None  # wall clock
        self.failures = 0
        self.last_error: str | None = None
        self.refused: set[str] = set()  # OPTIONAL_FIELDS it answered a 4xx about


class OpenAIBackend(BaseBackend):
    """``model.backend: openai``: see the module docstring."""

    name = "openai"

    def __init__(self, config: ModelConfig, *, attempts: int = ATTEMPTS, backoff_base: float = BACKOFF_BASE,
                 cooldown_base: float = COOLDOWN_BASE) -> None:
        """Args:
        config: the ``model:`` section (``base_url``, ``name``, ``api_key_env``,
            ``max_concurrency``, ``timeout``).
        attempts, backoff_base, cooldown_base: the retry policy (tests shorten it).

        Raises:
            VlwatchError: ``api_key_env`` names a variable that is not set.
        """
        if not config.base_url:
            raise VlwatchError("model.base_url: the openai backend needs at least one server URL", ExitCode.USAGE)
        self.config = config
        self.model = config.name
        self.max_concurrency = max(1, config.max_concurrency)
        self.attempts = max(1, attempts)
        self.backoff_base = backoff_base
        self.cooldown_base = cooldown_base
        #: ``vlwatch bench`` sets this so every answer runs to max_tokens (vLLM
        #: and SGLang honour it), and reads ``last_stats`` after each call.
        self.ignore_eos = False
        self.last_stats: dict[str, Any] = {}
        self._key = _read_key(config.api_key_env)
        self._servers = [_Server(u) for u in config.base_url]
        self._lock = threading.Lock()
        self._next = 0  # round-robin position
        self._in_flight = threading.BoundedSemaphore(self.max_concurrency)
        # Outcomes of the last batch that raised, by request identity: the
        # worker retries a failed batch one request at a time to find the
        # culprit, and those requests need not be sent again.
        self._salvaged: dict[int, tuple[Request, Answer | BackendError]] = {}

    # ------------------------------------------------------------ protocol

    @property
    def loaded(self) -> bool:
        """Whether connections to the servers are open (the model itself lives in them).

        Not simply True: the daemon unloads a loaded backend once it has been
        idle long enough, and would otherwise "unload" (and log it) on every
        idle check from then on.
        """
        with self._lock:
            return any(s.client is not None for s in self._servers)

    def unload(self) -> None:
        """Close the idle connections; the next request opens new ones."""
        with self._lock:
            clients = [s.client for s in self._servers if s.client is not None]
            for s in self._servers:
                s.client = None
        for client in clients:
            client.close()

    close = unload

    def auto_batch_size(self) -> int:
        """``batch_size: auto``: several times what may be in flight.

        In-flight requests are capped by ``max_concurrency`` anyway; a larger
        batch keeps the server's continuous batching fed instead of letting it
        drain at the end of each batch.
        """
        return 4 * self.max_concurrency

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        """Answer each request, in order, ``max_concurrency`` at a time.

        Raises:
            BackendUnavailableError: no server can be reached (or all say busy).
            BackendError: a request failed (a 4xx, or retries ran out); the
                other requests' answers are kept for the worker's retry.
        """
        if not requests:
            return []
        outcomes: list[Answer | BackendError | None] = [None] * len(requests)
        with self._lock:
            kept = self._salvaged.pop(id(requests[0]), None) if len(requests) == 1 else None
            if kept is not None and kept[0] is requests[0]:
                outcomes[0] = kept[1]
            else:
                self._salvaged.clear()  # the caller moved on: what it did not come back for is stale
        todo = [i for i, o in enumerate(outcomes) if o is None]
        if todo:
            self._run(requests, todo, outcomes)
        errors = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, BackendError)]
        if not errors:
            self.last_stats = {"new_tokens": sum(o.new_tokens for o in outcomes if isinstance(o, Answer))}
            return outcomes  # type: ignore[return-value]
        unavailable = next((o for _, o in errors if isinstance(o, BackendUnavailableError)), None)
        if len(requests) > 1:
            with self._lock:
                # Kept only for the worker's one-at-a-time retry of this batch;
                # an outage is not kept: that retry must ask the servers again.
                self._salvaged = {id(requests[i]): (requests[i], o) for i, o in enumerate(outcomes)
                                  if o is not None and not isinstance(o, BackendUnavailableError)}
        raise unavailable if unavailable is not None else errors[0][1]

    def _run(self, requests: Sequence[Request], todo: list[int], outcomes: list[Any]) -> None:
        workers = min(len(todo), self.max_concurrency)
        with ThreadPoolExecutor(workers, thread_name_prefix="vlwatch-openai") as pool:
            futures: dict[Future[Answer], int] = {pool.submit(self._answer, requests[i]): i for i in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    try:
                        outcomes[futures[f]] = f.result()
                    except BackendError as exc:
                        outcomes[futures[f]] = exc
                    except Exception as exc:  # a bug here must surface as this batch's error, not hang it
                        log.exception("unexpected error talking to the model server")
                        outcomes[futures[f]] = BackendError(f"unexpected error talking to the model server: {exc}")
                if any(isinstance(outcomes[futures[f]], BackendUnavailableError) for f in done):
                    # Every server is gone: what has not started would only fail the same way.
                    for f in pending:
                        if f.cancel():
                            outcomes[futures[f]] = BackendUnavailableError(str(self.outage() or "no server"))
                    pending = {f for f in pending if not f.cancelled()}

    # ------------------------------------------------------------ health

    def health(self) -> list[ServerHealth]:
        with self._lock:
            return [ServerHealth(s.display, s.up, s.down_since, s.last_error) for s in self._servers]

    def outage(self) -> Outage | None:
        """None while some server may be used; else since when none answers, and why."""
        with self._lock:
            if any(s.up for s in self._servers):
                return None
            since = min(s.down_since or time.time() for s in self._servers)
            error = "; ".join(f"{s.display}: {s.last_error}" for s in self._servers)
            return Outage(since, error)

    def available(self) -> bool:
        """Probe the servers that are due for it; whether any can take work now.

        For a paused daemon to ask when to resume, without sending a job.
        """
        for server in self._servers:
            with self._lock:
                due = not server.up and time.monotonic() >= server.available_at
            if due:
                self._probe(server)
        with self._lock:
            now = time.monotonic()
            return any(s.up and s.available_at <= now for s in self._servers)

    # ------------------------------------------------------------ one request

    def _answer(self, request: Request) -> Answer:
        images = [image_data_url(img) for img in request.images]
        last: _Retryable | None = None
        avoid: _Server | None = None
        attempt = timeouts = 0
        # Unreachable servers do not use up attempts, but each pass marks one
        # down, so this bounds the loop even if connects keep failing after probes pass.
        for _ in range(self.attempts + 2 * len(self._servers) + 2):
            if attempt >= self.attempts:
                break
            server = self._pick(avoid)
            if server is None:
                raise self._unavailable(last)
            try:
                return self._post(server, request, images)
            except _Unreachable as exc:
                self._mark_down(server, str(exc))
                avoid = server
                continue  # not an attempt: the next pick is another server, or none
            except _Retryable as exc:
                last, avoid, attempt = exc, server, attempt + 1
                if exc.check_alive and not self._probe_once(server):
                    continue  # the server itself is gone (now marked down), not just this request
                timeouts += exc.timeout
                if exc.timeout and timeouts >= TIMEOUT_ATTEMPTS:
                    break
                if exc.retry_after is not None and exc.retry_after > MAX_RETRY_AFTER:
                    self._cool(server, exc.retry_after, exc.reason)
                    continue
                if attempt < self.attempts:
                    self._sleep(exc.retry_after if exc.retry_after is not None else self._backoff(attempt))
        if last is None or last.busy:
            raise self._unavailable(last)
        tries = f"{attempt} tr{'y' if attempt == 1 else 'ies'}"
        hint = "; raise model.timeout or lower max_new_tokens" if last.timeout else ""
        raise BackendError(self._scrub(f"{last.reason} (gave up after {tries}{hint})"))

    def _post(self, server: _Server, request: Request, images: list[str]) -> Answer:
        body = chat_body(self.model, request, images, ignore_eos=self.ignore_eos)
        for name in server.refused:
            body.pop(name, None)
        started = time.monotonic()
        chars = answer_limit(request)
        with self._in_flight:
            response, cut = self._send(server, "POST", "/chat/completions", json_body=body,
                                       limit=chars * BODY_BYTES_PER_CHAR + BODY_SLACK)
        seconds = time.monotonic() - started
        log.debug("%s: %s -> HTTP %d in %.2fs", server.display, _sizes(request), response.status_code, seconds)
        self._mark_up(server)
        if response.status_code == 200:
            return self._parse(server, response, chars, cut)
        message = self._scrub(_server_message(response))
        status = response.status_code
        reason = f"{server.display}: HTTP {status}: {message}"
        if status in (429, 502, 503):  # full, down behind a proxy, or not ready: not the request's fault
            raise _Retryable(reason, retry_after=_retry_after(response), busy=True)
        if status >= 500 or status == 408:
            raise _Retryable(reason, retry_after=_retry_after(response))
        refused = {name for name in OPTIONAL_FIELDS if name in body and name in message}
        if refused:
            # Judged by this request's body: a concurrent one may have learnt it first.
            if not refused <= server.refused:
                log.info("%s refuses %s; asking without", server.display, ", ".join(sorted(refused)))
                server.refused |= refused
            return self._post(server, request, images)
        raise BackendError(reason)

    def _send(self, server: _Server, method: str, path: str, *, json_body: Any = None,
              timeout: float | None = None, limit: int = BODY_SLACK) -> tuple[httpx.Response, bool]:
        """One HTTP exchange, and whether its body was cut at ``limit`` bytes.

        ``timeout`` (default ``model.timeout``) bounds the whole exchange,
        connect to last byte, not each read: a server that drips a byte a
        second fails at ``timeout`` like one that says nothing (issue 10.13).
        At most ``limit`` bytes of the body are read; the connection is then
        dropped.  Transport failures become ``_Unreachable`` or ``_Retryable``.
        """
        client = self._client(server)
        seconds = timeout if timeout is not None else self.config.timeout
        _EXCHANGE.deadline = time.monotonic() + seconds
        try:
            with client.stream(method, server.url + path, json=json_body,
                               timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else httpx.Timeout(timeout)) as r:
                body, cut = bytearray(), False
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        del body[limit:]
                        cut = True
                        break
            # The body is already decoded (gzip...) and may be cut: the copy must not claim otherwise.
            headers = [(k, v) for k, v in r.headers.multi_items()
                       if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
            return httpx.Response(r.status_code, headers=headers, content=bytes(body), request=r.request), cut
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Unreachable(_transport_reason(exc)) from None
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
            reason = f"{server.display}: no answer within {seconds:g}s ({_transport_reason(exc)})"
            raise _Retryable(reason, timeout=True, check_alive=True) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            reason = f"{server.display}: connection dropped ({_transport_reason(exc)})"
            raise _Retryable(reason, check_alive=True) from None
        except httpx.TransportError as exc:  # proxy errors, unsupported protocol...
            raise _Unreachable(_transport_reason(exc)) from None
        finally:
            _EXCHANGE.deadline = None

    def _parse(self, server: _Server, response: httpx.Response, chars: int, cut: bool = False) -> Answer:
        """The answer in a 200 reply, cut at ``chars`` characters (then marked unfinished).

        A reply whose body was cut at the byte limit is not JSON any more: the
        beginning of its ``content`` string is salvaged, as a local model's
        answer cut at ``max_new_tokens`` is kept.  No content at all (null,
        missing, empty) is an error, never an empty sidecar that counts as done.
        """
        if cut:
            text = _salvage_content(response.content)
            if text is None:
                raise BackendError(f"{server.display}: an answer over {len(response.content)} bytes without "
                                   "readable content; lower max_new_tokens or check the server")
            log.warning("%s: answer over %d bytes; cut at %d characters", server.display,
                        len(response.content), chars)
            return Answer(text=text[:chars], new_tokens=0, finished=False)
        try:
            data = response.json()
            choice = data["choices"][0]
            content = (choice.get("message") or {}).get("content")
            usage = data.get("usage") or {}
            tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            snippet = self._scrub(response.text[:200])
            raise BackendError(f"{server.display}: an answer vlwatch cannot read ({exc!r}): {snippet!r}") from None
        if isinstance(content, list):  # some servers send content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if not isinstance(content, str) or not content.strip():
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            raise BackendError(f"{server.display}: the server sent no answer text (content: "
                               f"{json.dumps(content)[:40]}, finish_reason: {reason})")
        finished = choice.get("finish_reason") == "stop"
        if len(content) > chars:
            content, finished = content[:chars], False
        return Answer(text=content, new_tokens=tokens, finished=finished)

    # ------------------------------------------------------------ choosing a server

    def _pick(self, avoid: _Server | None) -> _Server | None:
        """The next server to send to, round-robin, probing one back from its cool-down first."""
        for _ in range(len(self._servers) + 1):
            with self._lock:
                now = time.monotonic()
                ready = [s for s in self._rotation() if s.available_at <= now]
                if len(ready) > 1 and avoid in ready:
                    ready.remove(avoid)  # a retry goes elsewhere when it can
                if not ready:
                    return None
                server = ready[0]
                self._next = (self._servers.index(server) + 1) % len(self._servers)
                if not server.needs_probe:
                    return server
            self._probe(server)
        return None

    def _rotation(self) -> list[_Server]:
        return self._servers[self._next:] + self._servers[:self._next]

    def _probe(self, server: _Server) -> None:
        with server.probe_lock:  # one probe per server at a time; the others wait for its verdict
            with self._lock:
                if not server.needs_probe:
                    return
            self._probe_once(server)

    def _probe_once(self, server: _Server) -> bool:
        try:
            response, _ = self._send(server, "GET", "/models", timeout=min(PROBE_TIMEOUT, self.config.timeout))
        except (_Unreachable, _Retryable) as exc:
            self._mark_down(server, str(exc.args[0]) if exc.args else "does not answer")
            return False
        if response.status_code >= 500:
            self._mark_down(server, f"HTTP {response.status_code}: {self._scrub(_server_message(response))}")
            return False
        # Any other answer (even 401 or 404) means something is listening there.
        self._mark_up(server)
        return True

    def _mark_down(self, server: _Server, reason: str) -> None:
        reason = self._scrub(reason)
        with self._lock:
            server.failures += 1
            rest = min(COOLDOWN_CAP, self.cooldown_base * 2 ** (server.failures - 1))
            server.available_at = time.monotonic() + rest
            server.needs_probe = True
            server.last_error = reason
            if server.up:
                server.up = False
                server.down_since = time.time()
                log.warning("model server %s is down (%s); trying again in %.1fs", server.display, reason, rest)
            else:
                log.debug("model server %s still down (%s); next probe in %.1fs", server.display, reason, rest)

    def _mark_up(self, server: _Server) -> None:
        with self._lock:
            if not server.up:
                away = time.time() - (server.down_since or time.time())
                log.info("model server %s answers again (after %.0fs)", server.display, away)
            server.up, server.needs_probe, server.failures = True, False, 0
            server.down_since = None

    def _cool(self, server: _Server, seconds: float, reason: str) -> None:
        """A server asked for a long pause (Retry-After): send it nothing until then."""
        with self._lock:
            server.available_at = time.monotonic() + seconds
            server.last_error = reason
        log.warning("%s asks to wait %.0fs; sending its work elsewhere meanwhile", server.display, seconds)

    def _unavailable(self, last: _Retryable | None) -> BackendUnavailableError:
        outage = self.outage()
        if outage is not None:
            return BackendUnavailableError(str(outage))
        reason = last.reason if last is not None else "every server is resting"
        return BackendUnavailableError(self._scrub(f"no model server can take work now: {reason}"))

    # ------------------------------------------------------------ plumbing

    def _client(self, server: _Server) -> httpx.Client:
        with self._lock:
            if server.client is None:
                server.client = _new_client(server.url, self._key, self.max_concurrency, self.config.timeout)
            return server.client

    def _backoff(self, attempt: int) -> float:
        ceiling = min(BACKOFF_CAP, self.backoff_base * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter: threads do not retry in step

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            log.debug("retrying in %.1fs", seconds)
            time.sleep(seconds)

    def _scrub(self, text: str) -> str:
        """Never let the key into a message, even if a server echoes it back."""
        return text.replace(self._key, "***") if self._key else text


# ---------------------------------------------------------------- the request


def chat_body(model: str, request: Request, images: list[str], *, ignore_eos: bool = False) -> dict[str, Any]:
    """The JSON of one chat completion: the images (as data URLs) then the prompt.

    Args:
        model: the served model name.
        request: what to ask.
        images: ``request.images`` as data URLs (``image_data_url``).
        ignore_eos: ask the server to generate all ``max_tokens`` (for the bench).
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": _chat_messages(request, images),
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "stream": False,
    }
    if request.images:
        areas = [img.width * img.height for img in request.images]
        # vLLM hands these to the HF processor: smart_resize within [area,
        # area] of an image whose sides are multiples of 28 is the identity,
        # so the server sees exactly our pixels.
        body["mm_processor_kwargs"] = {"min_pixels": min(areas), "max_pixels": max(areas)}
        # transformers serve hands chat_template_kwargs to apply_chat_template,
        # which passes processor_kwargs on to the processor (vLLM and SGLang
        # ignore keys their chat template does not use).
        body["chat_template_kwargs"] = {"processor_kwargs": {"do_resize": False}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _chat_messages(request: Request, images: list[str]) -> list[dict[str, Any]]:
    """A folder job as one user turn (images, then the prompt); a chat turn by turn, images where they were given."""
    if not request.messages:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        content.append({"type": "text", "text": request.prompt})
        return [{"role": "user", "content": content}]
    # The turns hold the very image objects of request.images, in order.
    urls = {id(img): url for img, url in zip(request.images, images)}
    out: list[dict[str, Any]] = []
    for message in request.messages:
        parts: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            else:
                parts.append({"type": "image_url", "image_url": {"url": urls.get(id(part)) or image_data_url(part)}})
        if message.role != "user" and all(p["type"] == "text" for p in parts):
            out.append({"role": message.role, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": message.role, "content": parts})
    return out


def image_data_url(image: "Image.Image") -> str:
    """The image as a lossless PNG ``data:`` URL, pixel for pixel."""
    buf = io.BytesIO()
    # PNG keeps every pixel; level 1 because encoding time matters more than
    # bytes on the wire to a server on the same network.
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _sizes(request: Request) -> str:
    return ", ".join(f"{i.width}x{i.height}" for i in request.images) or "text only"


# ---------------------------------------------------------------- HTTP helpers


def _read_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise VlwatchError(f"model.api_key_env names the environment variable {env_name}, but it is not set "
                           "(or empty); export the key there, or remove api_key_env", ExitCode.USAGE)
    return key


def _new_client(url: str, key: str | None, connections: int, timeout: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    client = httpx.Client(
        headers=headers,
        timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        follow_redirects=False,
        # HTTP(S)_PROXY is honoured for remote servers, but a loopback server
        # is never reached through a proxy.
        trust_env=not _is_loopback(url),
    )
    # httpx bounds each read, not the exchange: give every connection pool
    # (the direct one and any proxy's) a network backend that bounds each
    # read and write by the time left to the exchange (issue 10.13).
    for transport in [client._transport, *client._mounts.values()]:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_network_backend"):
            pool._network_backend = _DeadlineBackend(pool._network_backend)
    return client


#: The deadline (``time.monotonic``) of the exchange this thread is making.
_EXCHANGE = threading.local()


def _time_left(timeout: float | None, error: type[Exception]) -> float | None:
    deadline = getattr(_EXCHANGE, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the request's time is up")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits no longer than the exchange has left."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _time_left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, _time_left(timeout, httpcore.ConnectTimeout),
                                         local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _time_left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def answer_limit(request: Request) -> int:
    """Characters of answer kept for ``request``: ``CHARS_PER_TOKEN`` per ``max_new_tokens``."""
    return max(1, request.max_new_tokens) * CHARS_PER_TOKEN


_CONTENT = re.compile(rb'"content"\s*:\s*"')
_ESCAPE_OR_QUOTE = re.compile(r'\\.|"', re.DOTALL)


def _salvage_content(raw: bytes) -> str | None:
    """The (beginning of the) first ``content`` string of a JSON reply cut short, decoded."""
    m = _CONTENT.search(raw)
    if m is None:
        return None
    rest = raw[m.end():].decode("utf-8", "ignore")
    end = len(rest)  # the closing quote, if the cut came after it
    for token in _ESCAPE_OR_QUOTE.finditer(rest):  # a scan, not a backtracking match over megabytes
        if token.group() == '"':
            end = token.start()
            break
    text = rest[:end]
    for back in range(8):  # the cut may fall inside an escape such as \u00e9
        try:
            return json.loads(f'"{text[:len(text) - back]}"')
        except ValueError:
            continue
    return None


def _is_loopback(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _transport_reason(exc: Exception) -> str:
    text = str(exc).strip()
    kind = type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return f"{kind}: {text}" if text else kind


def _server_message(response: httpx.Response) -> str:
    """The server's own words about an error, on one line."""
    try:
        data = response.json()
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or data.get("message") or data.get("detail")  # vLLM/SGLang, FastAPI
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    if not message:
        message = response.text.strip() or response.reason_phrase
    one_line = " ".join(str(message).split())
    return one_line[:500]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())

