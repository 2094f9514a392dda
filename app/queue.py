"""The Redis Stream the API publishes edit ids to and the worker consumes with a consumer group.
The stream only carries ids: the edit row in SQL stays the source of truth, so a lost or
repeated message never loses or doubles an edit."""
from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)

CLAIM_IDLE_MS = 60_000  # entries another (dead) consumer held this long are taken over


class EditQueue:
    def __init__(self, url: str, stream: str, group: str, consumer: str = "api"):
        # Short timeouts: a Redis that is down must not hold up POST /edits.
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
        self.stream, self.group, self.consumer = stream, group, consumer
        self._recovered = False  # whether this consumer re-read its pending entries yet

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def publish(self, edit_ids: list[int]) -> bool:
        """XADD each id; False (and nothing raised) when Redis is unreachable."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for edit_id in edit_ids:
                    pipe.xadd(self.stream, {"edit_id": str(edit_id)})
                pipe.execute()
            return True
        except redis.RedisError as err:
            log.warning("could not publish edits %s: %s", edit_ids, err)
            return False

    def stream_exists(self) -> bool:
        return bool(self.client.exists(self.stream))

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def fetch(self, count: int, block_ms: int) -> list[tuple[str, int]]:
        """Next (message id, edit id) pairs. First call after a (re)connect returns this
        consumer's pending entries and stale ones of other consumers: a worker that died mid-edit
        resumes them. Raises redis.RedisError when Redis is down."""
        if not self._recovered:
            self._ensure_group()
            own = self.client.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=1000)
            claimed = self.client.xautoclaim(
                self.stream, self.group, self.consumer, CLAIM_IDLE_MS, start_id="0-0", count=1000
            )
            self._recovered = True
            entries = (own[0][1] if own else []) + claimed[1]
            if entries:
                return self._parse(entries)
        try:
            reply = self.client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=max(1, block_ms)
            )
        except redis.ResponseError as err:
            if "NOGROUP" in str(err):  # Redis lost its data: recreate the group next time
                self._recovered = False
                return []
            raise
        except redis.RedisError:
            self._recovered = False
            raise
        return self._parse(reply[0][1]) if reply else []

    @staticmethod
    def _parse(entries) -> list[tuple[str, int]]:
        out = []
        for message_id, fields in entries:
            if not fields:  # deleted entry still listed as pending
                continue
            message = message_id.decode() if isinstance(message_id, bytes) else message_id
            value = fields.get(b"edit_id", fields.get("edit_id"))
            try:
                out.append((message, int(value)))
            except (TypeError, ValueError):
                log.warning("ignoring malformed stream entry %s: %r", message, fields)
        return out

    def ack(self, message_ids: list[str]) -> None:
        if message_ids:
            try:
                self.client.xack(self.stream, self.group, *message_ids)
            except redis.RedisError as err:  # redelivery is harmless: the row says it is applied
                log.warning("could not ack %s: %s", message_ids, err)
