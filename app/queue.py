"""The Redis Stream that wakes the worker when edits or restores arrive. It is a doorbell, not the
queue: the SQL rows are the queue and the worker takes them in log order, so a lost, repeated or
trimmed message changes nothing but latency (without it the worker polls every POLL_INTERVAL_S).
The stream is capped at about REDIS_STREAM_MAXLEN entries."""
from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)


class Doorbell:
    def __init__(self, url: str, stream: str, maxlen: int):
        # Short timeouts: a Redis that is down must not hold up POST /edits.
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
        self.stream, self.maxlen = stream, maxlen
        self._last_id = "$"  # only entries newer than the first wait

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def ring(self, what: str) -> bool:
        """XADD one entry (`what`: the ids that arrived, for reading the stream by hand); False
        when Redis is unreachable, which only delays the worker."""
        try:
            self.client.xadd(self.stream, {"what": what}, maxlen=self.maxlen, approximate=True)
            return True
        except redis.RedisError as err:
            log.warning("could not ring the worker (%s): it finds the work by polling", err)
            return False

    def wait(self, block_ms: int) -> bool:
        """Blocks until an entry arrives after the last one seen, or `block_ms` passes; raises
        redis.RedisError when Redis is down."""
        # the socket timeout must outlast the block
        reply = self.client.xread({self.stream: self._last_id}, count=100, block=max(1, block_ms))
        if not reply:
            return False
        assert isinstance(reply, list)  # RESP2, the client's protocol: [[stream, entries]]
        entries = reply[0][1]
        last = entries[-1][0]
        self._last_id = last.decode() if isinstance(last, bytes) else last
        return True
