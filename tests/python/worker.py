"""A gateway worker in Python with nothing but the plain NATS client (nats-py), following the wire
contract in docs/wire-contract.md. The any-language test runs it; it is also the smallest
complete example of a worker outside Rust.

Usage: python worker.py <nats-url> <route>
"""

import asyncio
import base64
import hashlib
import json
import secrets
import sys

import nats
from nats.js.errors import APIError, NotFoundError

ALREADY_STORED = (10071, 10077)  # wrong last sequence / per-subject limit: a result exists
REPLY_INLINE_MAX = 512 * 1024  # a larger reply body goes to the bucket the request names


async def body_of(js, h, msg):
    """The request's body: in the message, or (contract 3) in the Object Store bucket and object
    the request names, checked against the size and SHA-256 digest it gives."""
    if h.get("Gw-Contract") != "3":
        return msg.data
    store = await js.object_store(h["Gw-Body-Bucket"])
    data = (await store.get(h["Gw-Body-Object"])).data
    digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    if len(data) != int(h["Gw-Body-Size"]) or digest != h["Gw-Body-Digest"]:
        raise ValueError("the stored body is not the one the request names")
    return data


async def handle(js, msg):
    h = msg.headers or {}
    operation_id = h["Gw-Operation-Id"]
    reply_subject = h["Gw-Reply-Subject"]
    # Contract 2 names the reply's stream; contract 1 (no header) used GW_RESULTS.
    reply_stream = h.get("Gw-Reply-Stream", "GW_RESULTS")
    # 1. Skip what is already answered (a redelivery, or a cancelled/expired operation).
    try:
        await js.get_last_msg(reply_stream, reply_subject, direct=True)
        await msg.ack()
        return
    except NotFoundError:
        pass
    # 2. The body, wherever it is; one that cannot be read yet is tried again later.
    try:
        data = await body_of(js, h, msg)
    except Exception:  # noqa: BLE001 - any failure to read means: not now
        await msg.nak(delay=1)
        return
    # 3. Answer: the reply's body and headers are what the gateway replays. `?raw` asks for
    #    the request's body back, as is.
    raw = h.get("Gw-Query") == "raw"
    body = data if raw else json.dumps({
        "handled_by": "python",
        "operation_id": operation_id,
        "method": h.get("Gw-Method"),
        "path": h.get("Gw-Path"),
        "query": h.get("Gw-Query"),
        "echo": data.decode() if len(data) <= 4096 else None,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }).encode()
    headers = {
        "Gw-Status": "200" if raw else "201",
        "Content-Type": "application/octet-stream" if raw else "application/json",
        "Nats-Expected-Last-Subject-Sequence": "0",
    }
    if len(body) > REPLY_INLINE_MAX and "Gw-Reply-Bucket" in h:
        # Too large for a message: stored in the bucket the request names, under a name of the
        # operation's own, and the reply names it (the Gw-Body-* headers) with an empty payload.
        bucket = h["Gw-Reply-Bucket"]
        name = f"{operation_id}.result.{secrets.token_hex(16)}"
        info = await (await js.object_store(bucket)).put(name, body)
        headers.update({
            "Gw-Body-Bucket": bucket,
            "Gw-Body-Object": name,
            "Gw-Body-Size": str(info.size),
            "Gw-Body-Digest": info.digest,
        })
        body = b""
    if "Gw-Reply-Stream" not in h:
        # Contract 1: the reply lives as long as the request. (Contract 2's stream refuses a TTL.)
        headers["Nats-TTL"] = h.get("Gw-Retention", "86400")
    try:
        await js.publish(reply_subject, body, headers=headers)
    except APIError as e:
        if e.err_code not in ALREADY_STORED:
            await msg.nak(delay=0.5)  # try again later
            return
    # 4. Ack last, after the reply's ack.
    await msg.ack()


async def main(url, route):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(f"gw.req.{route}.>", durable=f"python-{route}", stream="GW_REQUESTS")
    print("ready", flush=True)
    while True:
        try:
            messages = await sub.fetch(16, timeout=1)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            # An empty pull (nats-py raises either, depending on where the wait ended).
            continue
        for msg in messages:
            await handle(js, msg)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
