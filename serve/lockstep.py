"""Serving across JAX processes: process 0 decides, the others repeat its device calls.

Process 0 runs HTTP, Gradio and the scheduler. Before each call on its
DeviceBatch it broadcasts the call (method name and host arguments, pickled)
to the other processes with `multihost_utils.broadcast_one_to_all`, which is a
collective over every device: the followers, blocked in the same broadcast,
receive it and make the same call on their own DeviceBatch, so all processes
run the same compiled steps in the same order. While idle the leader
broadcasts a `ping` every second: a follower that has died makes that
collective fail at once, and the server reports itself unavailable instead of
hanging.
"""

from __future__ import annotations

import logging
import pickle

import numpy as np

log = logging.getLogger("easympt.serve")

STOP = "stop"
MIN_PAYLOAD = 256  # payloads are padded to powers of two from here: few compiled broadcast shapes


class FollowerLost(RuntimeError):
    """A broadcast to the other processes failed: one of them is gone."""


def _broadcast(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def send(method: str, args: tuple) -> None:
    """Leader: tell every follower to call `method(*args)`."""
    payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
    size = max(MIN_PAYLOAD, 1 << (len(payload) - 1).bit_length())
    buf = np.zeros(size, np.uint8)
    buf[:len(payload)] = np.frombuffer(payload, np.uint8)
    try:
        _broadcast(np.asarray([len(payload), size], np.int64))
        _broadcast(buf)
    except Exception as e:
        raise FollowerLost(f"a follower process stopped answering ({type(e).__name__}: {str(e)[:300]})") from e


def receive() -> tuple[str, tuple]:
    """Follower: the leader's next call (blocks until the leader sends one)."""
    n, size = (int(v) for v in _broadcast(np.zeros(2, np.int64)))
    buf = _broadcast(np.zeros(size, np.uint8))
    return pickle.loads(buf[:n].tobytes())


class Leader:
    """Wraps the leader's DeviceBatch: every method call is sent to the followers, then run here."""

    def __init__(self, batch):
        self._batch = batch

    def __getattr__(self, name):
        attr = getattr(self._batch, name)
        if not callable(attr):
            return attr

        def call(*args):
            send(name, args)
            return attr(*args)

        return call

    def stop_followers(self) -> None:
        send(STOP, ())


def follow(batch) -> None:
    """Follower: repeat the leader's calls on `batch` until it says stop. A call that fails here
    ends the loop: the processes could no longer be in step."""
    n = 0
    while True:
        try:
            method, args = receive()
        except Exception as e:
            raise RuntimeError(f"lost process 0 ({type(e).__name__}: {str(e)[:300]})") from e
        if method == STOP:
            log.warning("the leader stopped serving after %d engine calls", n)
            return
        try:
            getattr(batch, method)(*args)
        except Exception as e:
            raise RuntimeError(f"engine call {method} failed on this process, which can no longer follow "
                               f"process 0: {type(e).__name__}: {e}") from e
        n += 1
