"""A MULTI/EXEC whose reply is lost with its connection is not run twice by the client's retry.

A TCP proxy between client and a real server forwards EXEC, lets the server run it, then cuts the
connection before the reply gets back: what `CLIENT KILL`, a network blip or a server killed after
its AOF fsync do. A plain redis-py client retries and runs the transaction a second time; the
project's client (mmupt.streams.connect) runs it once.
"""
from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlparse

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from mmupt.streams import connect


class ReplyDropper:
    """Forwards bytes both ways; after forwarding the first EXEC it closes the connection unanswered."""

    def __init__(self, target_url: str):
        url = urlparse(target_url)
        self.target = (url.hostname, url.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = 0
        self.swallow = threading.Event()  # set: replies from the server are not relayed
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, upstream):
        try:
            while data := src.recv(65536):
                if not upstream and self.swallow.is_set():
                    continue
                cut = upstream and b"EXEC" in data and self.dropped == 0
                if cut:
                    self.dropped += 1
                    self.swallow.set()
                dst.sendall(data)
                if cut:
                    time.sleep(0.2)  # the server runs the transaction; its reply is never relayed
                    self.swallow.clear()
                    for sock in (src, dst):
                        sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                    return
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.close()
            except OSError:
                pass


def transact(client, key):
    pipe = client.pipeline(transaction=True)
    pipe.incr(key)
    pipe.rpush(key + ":log", "x")
    return pipe.execute()


def test_a_plain_client_runs_a_transaction_twice_when_its_reply_is_lost(redis_url, redis_client, run_id):
    proxy = ReplyDropper(redis_url)
    plain = redis.Redis(port=proxy.port, retry=Retry(ConstantBackoff(0.05), 3),
                        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    transact(plain, f"{run_id}:n")
    assert proxy.dropped == 1
    assert int(redis_client.get(f"{run_id}:n")) == 2  # the hazard this client guards against


def test_the_project_client_runs_it_once(redis_url, redis_client, run_id):
    proxy = ReplyDropper(redis_url)
    client = connect(f"redis://127.0.0.1:{proxy.port}/0")
    assert transact(client, f"{run_id}:n") == [None, None]  # ran; its replies were lost
    assert proxy.dropped == 1
    assert int(redis_client.get(f"{run_id}:n")) == 1 and redis_client.llen(f"{run_id}:n:log") == 1
    assert transact(client, f"{run_id}:n") == [2, 2]  # later transactions: normal replies
    assert int(redis_client.get(f"{run_id}:n")) == 2
