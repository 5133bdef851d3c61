"""Many calls on one long-lived bidirectional gRPC stream: the client side of ContinueStream and
ClassifyStream (proto/tierserve.proto).

A message on an open stream costs about half a new unary call in grpc (bare round trips measured by
bench/overhead.py: `bare_grpc_*` in bench/results/summary.json). Each request carries `call_id`
and `timeout_seconds`; each response echoes `call_id` with `status_code` / `status_message`
(0: OK). A call fails alone (its deadline, its status); a broken stream fails the calls waiting on
it as UNAVAILABLE, and the next call opens a new stream. Failures raise grpc.aio.AioRpcError, as
the unary call would; StreamsUnsupported when the server lacks the streaming method.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol, TypeVar

import grpc

log = logging.getLogger("tierserve.streaming")
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_LOCALLY_CANCELLED = "Locally cancelled by application!"
# seconds a stream's next read may be held back (ReadPause)
NEXT_READ_DELAY = 0.001
T = TypeVar("T")


class StreamsUnsupported(Exception):
    """The server has no such streaming method (an older version): call it unary instead."""


class StreamedMessage(Protocol):
    call_id: int
    timeout_seconds: float
    status_code: int
    status_message: str


def call_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a unary call ending with this status raises."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _stream_error(code: grpc.StatusCode, details: str) -> Exception:
    """What the calls waiting on a stream that ended with this status fail with."""
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return StreamsUnsupported(details)
    if code == grpc.StatusCode.CANCELLED and details == _LOCALLY_CANCELLED:
        return call_error(grpc.StatusCode.UNAVAILABLE, "the stream broke")
    return call_error(code, details)


def _prepare(request: StreamedMessage, call_id: int, timeout: float | None) -> None:
    request.call_id = call_id
    if timeout is not None:
        request.timeout_seconds = max(timeout, 1e-6)  # 0 would mean no deadline


def _result(response: Any) -> Any:
    if response.status_code:
        raise call_error(STATUS_BY_NUMBER.get(response.status_code, grpc.StatusCode.UNKNOWN),
                         response.status_message)
    return response


def _timed_out(timeout: float | None) -> grpc.aio.AioRpcError:
    return call_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"no response within {(timeout or 0) * 1000:.0f} ms")


def _expire(future: asyncio.Future[Any], timeout: float) -> None:
    if not future.done():
        future.set_exception(_timed_out(timeout))


def start_eagerly(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """A task of `coro` whose first step runs now, up to its first suspension, instead of on the
    event loop's next turn: Python 3.12's eager tasks, done by hand on 3.11. A write on a stream
    starts its send in that first step, so the message leaves before the caller's next line."""
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, eager_start=True)  # type: ignore[call-arg,unused-ignore]
    return _EagerRun(coro).future


class _EagerRun:
    """Drives a coroutine as asyncio.Task does, by callbacks: its first step at once, each later
    step when the future it waits on completes; `future` holds its outcome. No task, no
    asyncio.wait: after a send, the sender has as little as possible left to do before it sleeps
    (the kernel often wakes the receiver on the sender's CPU). Cancelling `future` cancels what the
    coroutine waits on, so it sees the cancellation."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] = self.loop.create_future()
        self.waiting: asyncio.Future[Any] | None = None
        self.cancelling = False
        self._step()
        if not self.future.done():
            self.future.add_done_callback(self._on_done)

    def _step(self, _: object = None) -> None:
        throw = self.cancelling and not (self.waiting is not None and self.waiting.cancelled())
        self.cancelling = False
        try:
            waiting = self.coro.throw(asyncio.CancelledError()) if throw else self.coro.send(None)
        except StopIteration as done:
            if not self.future.done():
                self.future.set_result(done.value)
            return
        except asyncio.CancelledError:
            self.future.cancel()
            return
        except Exception as exc:
            if not self.future.done():
                self.future.set_exception(exc)
            return
        self.waiting = waiting
        if waiting is None:  # a bare yield (asyncio.sleep(0))
            self.loop.call_soon(self._step)
        else:
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(self._step)

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self.cancelling = True
            if self.waiting is not None:
                self.waiting.cancel()  # (no-op if done) its callback steps the coroutine on


class ReadPause:
    """Holds a stream's next read back for a moment: setting a read up costs ~30 us of grpc calls,
    and right after a message has left, the kernel may be waking its receiver on this CPU, where
    the receiver waits for that work. wait(delay) ends after `delay` or at open(): whoever knows
    the read is needed sooner (a new call on the stream, a call answered) opens it."""

    def __init__(self) -> None:
        self._gate: asyncio.Future[None] | None = None

    async def wait(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        gate = self._gate = loop.create_future()
        timer = loop.call_later(delay, _open, gate)
        try:
            await gate
        finally:
            timer.cancel()
            self._gate = None

    def open(self) -> None:
        if self._gate is not None:
            _open(self._gate)


def _open(gate: asyncio.Future[None]) -> None:
    if not gate.done():
        gate.set_result(None)


class _AsyncStream:
    """One open stream: callers queue requests and the writer task sends them, started eagerly so
    that a lone request leaves at once; a reader task hands each response to its call's future.
    Callers never write themselves: cancelling a write cancels the whole stream."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.outbox: collections.deque[Any] = collections.deque()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Future[None] | None = None  # while it sends what is queued
        self.read_pause = ReadPause()


class AsyncCallStream:
    """Calls multiplexed on one stream, opened by `open_call()` (a stub's stream-stream method) when
    needed (asyncio; create it inside a running event loop)."""

    def __init__(self, open_call: Callable[[], Any]) -> None:
        self.open_call = open_call
        self._stream: _AsyncStream | None = None
        self._call_ids = itertools.count(1)

    async def call(self, request: Any, timeout: float | None) -> Any:
        """The response to `request` (its call_id and timeout_seconds are set here)."""
        stream = self._stream or self._open()
        call_id = next(self._call_ids)
        _prepare(request, call_id, timeout)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        stream.pending[call_id] = future
        stream.outbox.append(request)
        if stream.writer is None or stream.writer.done():
            stream.writer = start_eagerly(self._write(stream))
        stream.read_pause.open()  # this call's response needs the reader
        # a timer that fails the future: cheaper than asyncio.timeout, which cancels the whole task
        expiry = None if timeout is None else loop.call_later(timeout, _expire, future, timeout)
        try:
            response = await future
        finally:
            stream.pending.pop(call_id, None)
            if expiry is not None:
                expiry.cancel()
        return _result(response)

    def _open(self) -> _AsyncStream:
        stream = _AsyncStream(self.open_call())
        stream.reader = asyncio.create_task(self._read(stream))
        self._stream = stream
        return stream

    async def _write(self, stream: _AsyncStream) -> None:
        """Send what is queued, then end (the next call starts a new writer)."""
        try:
            while stream.outbox:
                await stream.call.write(stream.outbox.popleft())
        except grpc.aio.AioRpcError as exc:
            self._end(stream, _stream_error(exc.code(), exc.details() or ""))
        except Exception as exc:  # the call ended under the write (InvalidStateError): the reader says why
            log.debug("write on a stream failed: %r", exc)
            stream.call.cancel()

    async def _read(self, stream: _AsyncStream) -> None:
        error: Exception
        try:
            while (response := await stream.call.read()) is not grpc.aio.EOF:
                future = stream.pending.pop(response.call_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
                    # its caller first, which sends its own answer on; with no other call waiting,
                    # the next read is held back until the next call (ReadPause)
                    if stream.pending:
                        await asyncio.sleep(0)
                    else:
                        await stream.read_pause.wait(NEXT_READ_DELAY)
            error = call_error(grpc.StatusCode.UNAVAILABLE, "the server ended the stream (shutting down?)")
        except grpc.aio.AioRpcError as exc:
            error = _stream_error(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            error = call_error(grpc.StatusCode.CANCELLED, "the client closed")
        self._end(stream, error)

    def _end(self, stream: _AsyncStream, error: Exception) -> None:
        """The stream is over: every call waiting on it fails with `error`; the next call opens a new one."""
        if self._stream is stream:
            self._stream = None
        for future in stream.pending.values():
            if not future.done():
                future.set_exception(error)
        stream.pending.clear()
        stream.call.cancel()
        stream.outbox.clear()
        for task in (stream.reader, stream.writer):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    def close(self) -> None:
        if self._stream is not None:
            self._end(self._stream, call_error(grpc.StatusCode.CANCELLED, "the client closed"))


_END = object()  # ends a stream's request iterator


class _SyncStream:
    """One open stream: grpc's own thread sends what the outbox yields, a reader thread hands each
    response to its call's future."""

    def __init__(self, open_call: Callable[[Iterator[Any]], Any]) -> None:
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.pending: dict[int, Future[Any]] = {}
        self.lock = threading.Lock()
        self.ended: Exception | None = None
        self.responses = open_call(iter(self.outbox.get, _END))


class SyncCallStream:
    """Calls multiplexed on one stream from any number of threads, opened by
    `open_call(requests)` (a blocking stub's stream-stream method) when needed."""

    def __init__(self, open_call: Callable[[Iterator[Any]], Any]) -> None:
        self.open_call = open_call
        self._stream: _SyncStream | None = None
        self._lock = threading.Lock()
        self._call_ids = itertools.count(1)

    def call(self, request: Any, timeout: float | None) -> Any:
        """The response to `request` (its call_id and timeout_seconds are set here)."""
        future: Future[Any] = Future()
        with self._lock:
            stream = self._stream or self._open()
            call_id = next(self._call_ids)
        _prepare(request, call_id, timeout)
        with stream.lock:
            if stream.ended is not None:
                raise stream.ended
            stream.pending[call_id] = future
        stream.outbox.put(request)
        try:
            return _result(future.result(timeout))
        except FutureTimeout:
            raise _timed_out(timeout) from None
        finally:
            with stream.lock:
                stream.pending.pop(call_id, None)

    def _open(self) -> _SyncStream:
        stream = _SyncStream(self.open_call)
        threading.Thread(target=self._read, args=(stream,), name="tierserve-stream-reader", daemon=True).start()
        self._stream = stream
        return stream

    def _read(self, stream: _SyncStream) -> None:
        error: Exception
        try:
            for response in stream.responses:
                with stream.lock:
                    future = stream.pending.pop(response.call_id, None)
                if future is not None:
                    future.set_result(response)
            error = call_error(grpc.StatusCode.UNAVAILABLE, "the server ended the stream (shutting down?)")
        except grpc.RpcError as exc:
            error = _stream_error(exc.code(), exc.details() or "")  # type: ignore[attr-defined]
        with self._lock:
            if self._stream is stream:
                self._stream = None
        with stream.lock:
            stream.ended = error
            waiting, stream.pending = list(stream.pending.values()), {}
        for future in waiting:
            future.set_exception(error)
        stream.outbox.put(_END)

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.outbox.put(_END)  # the server sees the end of the requests and ends the stream
            stream.responses.cancel()


TRANSPORTS = ("stream", "unary")


def _unary_request(request: Any) -> Any:
    request.ClearField("call_id")
    request.ClearField("timeout_seconds")
    return request


def _check_transport(transport: str) -> bool:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}: one of {', '.join(TRANSPORTS)}")
    return transport == "stream"


class AsyncCalls:
    """One kind of call to `address` (asyncio): on a stream (transport "stream", opened with
    `open_stream`) while the server offers one, else, or with transport "unary", as `unary` calls."""

    def __init__(self, open_stream: Callable[[], Any], unary: Callable[..., Any], address: str,
                 transport: str = "stream") -> None:
        self.unary = unary
        self.address = address
        self.stream = AsyncCallStream(open_stream) if _check_transport(transport) else None

    async def call(self, request: Any, timeout: float | None) -> Any:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        if self.stream is not None:
            try:
                return await self.stream.call(request, timeout)
            except StreamsUnsupported:
                log.warning("%s has no streaming method (an older version?): calling it unary", self.address)
                self.stream.close()
                self.stream = None
        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        return await self.unary(_unary_request(request), timeout=left)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class SyncCalls:
    """AsyncCalls for blocking stubs: safe to use from many threads at once."""

    def __init__(self, open_stream: Callable[[Iterator[Any]], Any], unary: Callable[..., Any], address: str,
                 transport: str = "stream") -> None:
        self.unary = unary
        self.address = address
        self.stream = SyncCallStream(open_stream) if _check_transport(transport) else None

    def call(self, request: Any, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self.stream
        if stream is not None:
            try:
                return stream.call(request, timeout)
            except StreamsUnsupported:
                log.warning("%s has no streaming method (an older version?): calling it unary", self.address)
                self.stream = None
                stream.close()
        left = None if deadline is None else deadline - time.monotonic()
        return self.unary(_unary_request(request), timeout=left)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
