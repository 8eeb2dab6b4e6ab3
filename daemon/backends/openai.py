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
time left (``openai_wire._DeadlineBackend``), so a server dripping a byte a second
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

The body, the bounded HTTP client and the reading of replies and errors are
``openai_wire``; this module picks servers, retries and keeps their health.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import httpx

from daemon.backends import Answer, BaseBackend, Request
from daemon.backends.openai_wire import (BODY_BYTES_PER_CHAR, BODY_SLACK, EXCHANGE, answer_limit, chat_body,
                                        image_data_url, new_client, read_key, retry_after, salvage_content,
                                        server_message, sizes_of, transport_reason, without_userinfo)
from daemon.config import ModelConfig
from daemon.errors import BackendError, BackendUnavailableError, ExitCode, VlwatchError

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
#: Extensions to the OpenAI schema that some servers refuse outright
#: (``transformers serve`` answers 422 "Unexpected fields"): a server whose 4xx
#: names one is asked again without it, and never sent it again.
OPTIONAL_FIELDS = ("mm_processor_kwargs", "chat_template_kwargs", "ignore_eos")


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
        self.display = without_userinfo(self.url)
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
        self._key = read_key(config.api_key_env)
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
        log.debug("%s: %s -> HTTP %d in %.2fs", server.display, sizes_of(request), response.status_code, seconds)
        self._mark_up(server)
        if response.status_code == 200:
            return self._parse(server, response, chars, cut)
        message = self._scrub(server_message(response))
        status = response.status_code
        reason = f"{server.display}: HTTP {status}: {message}"
        if status in (429, 502, 503):  # full, down behind a proxy, or not ready: not the request's fault
            raise _Retryable(reason, retry_after=retry_after(response), busy=True)
        if status >= 500 or status == 408:
            raise _Retryable(reason, retry_after=retry_after(response))
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
        EXCHANGE.deadline = time.monotonic() + seconds
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
            raise _Unreachable(transport_reason(exc)) from None
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
            reason = f"{server.display}: no answer within {seconds:g}s ({transport_reason(exc)})"
            raise _Retryable(reason, timeout=True, check_alive=True) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            reason = f"{server.display}: connection dropped ({transport_reason(exc)})"
            raise _Retryable(reason, check_alive=True) from None
        except httpx.TransportError as exc:  # proxy errors, unsupported protocol...
            raise _Unreachable(transport_reason(exc)) from None
        finally:
            EXCHANGE.deadline = None

    def _parse(self, server: _Server, response: httpx.Response, chars: int, cut: bool = False) -> Answer:
        """The answer in a 200 reply, cut at ``chars`` characters (then marked unfinished).

        A reply whose body was cut at the byte limit is not JSON any more: the
        beginning of its ``content`` string is salvaged, as a local model's
        answer cut at ``max_new_tokens`` is kept.  No content at all (null,
        missing, empty) is an error, never an empty sidecar that counts as done.
        """
        if cut:
            text = salvage_content(response.content)
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
            self._mark_down(server, f"HTTP {response.status_code}: {self._scrub(server_message(response))}")
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
                server.client = new_client(server.url, self._key, self.max_concurrency, self.config.timeout)
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
